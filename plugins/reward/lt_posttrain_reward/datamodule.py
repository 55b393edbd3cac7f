"""``data: {class_path: reward}``: reward pairs, planned and batched so that a pair never splits."""

import torch

from lt_posttrain import (
    IGNORE_INDEX,
    InstructDataModule,
    MicroBatch,
    MicroBatchDataset,
    collate_packed,
    collate_padded,
    load_samples,
)
from lt_posttrain_reward.tokenize import SIDES, tokenize_reward_pairs


class RewardDataModule(InstructDataModule):
    """Reward pairs; the arguments are :class:`~lt_posttrain.InstructDataModule`'s, and the sources' ``type`` is
    ``reward_pairs`` (rows ``{prompt or messages, chosen, rejected, margin}``).

    A pair is one training unit: the validation hold-out, the weighted mix, shuffling and packing move whole pairs,
    and a micro-batch holds each of its pairs' chosen conversation followed by its rejected one. So ``batch_size``
    counts pairs (with ``packing``: packed rows of whole pairs), and ``max_length`` applies to each conversation
    (``overlong: drop`` leaves out a pair with a longer one, as TRL's ``RewardTrainer`` does; ``truncate`` scores
    the cut conversation). A pair's ``loss_count`` is 1, so the step's loss is divided by its number of pairs.
    """

    sequences_per_sample = 2  # a pair is two sequences in a batch (for data.static_shapes)

    def tokenize(self, sources):
        return load_samples(sources, self.tokenizer, self.max_length, self.chat_template, self.overlong,
                            self.num_proc, tokenize=tokenize_reward_pairs)  # fmt: skip

    def batch_dataset(self, samples) -> MicroBatchDataset:
        return RewardBatchDataset(samples, self.packing, self.tokenizer.pad_token_id)


class RewardBatchDataset(MicroBatchDataset):
    """A planned micro-batch of pairs as the tensors of its conversations (padded, or packed into one row), chosen
    then rejected for each pair, no targets (a reward model scores a whole conversation), with ``margin``
    (``[pairs]``) and the pair counts (``loss_count``, ``step_loss_count``) of the plan."""

    def __getitem__(self, micro_batch: MicroBatch) -> dict:
        pairs = self.samples[[index for pack in micro_batch.packs for index in pack]]
        sequences = [{"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)}
                     for pair in range(len(pairs["length"])) for ids in (pairs[f"{side}_input_ids"][pair]
                                                                          for side in SIDES)]  # fmt: skip
        batch = collate_packed(sequences) if self.packing else collate_padded(sequences, self.pad_id)
        batch["margin"] = torch.tensor(pairs["margin"], dtype=torch.float32)
        batch["loss_count"] = torch.tensor(micro_batch.loss_count)
        batch["step_loss_count"] = torch.tensor(micro_batch.step_loss_count)
        return batch
