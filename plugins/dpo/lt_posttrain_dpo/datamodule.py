"""``data: {class_path: preference}``: preference pairs, planned and batched so that a pair never splits."""

import torch

from lt_posttrain import InstructDataModule, MicroBatch, MicroBatchDataset, collate_packed, collate_padded, load_samples
from lt_posttrain_dpo.pairs import REFERENCE_COLUMNS
from lt_posttrain_dpo.tokenize import SIDES, tokenize_pairs


class PreferenceDataModule(InstructDataModule):
    """Preference pairs for DPO; the arguments are :class:`~lt_posttrain.InstructDataModule`'s, and the sources'
    ``type`` is ``preference_pairs`` (rows ``{prompt or messages, chosen, rejected}``).

    A pair is one training unit: the validation hold-out, the weighted mix, shuffling and packing move whole pairs,
    and a micro-batch holds each of its pairs' chosen answer followed by its rejected answer. So ``batch_size``
    counts pairs (with ``packing``: packed rows of whole pairs, up to ``max_length`` tokens, a longer pair alone in
    its row), and ``max_length`` applies to each prompt-and-answer sequence. A pair's ``loss_count`` is 1, so the step's
    loss is divided by its number of pairs (``data prepare`` counts them as its 'loss tokens').
    """

    sequences_per_sample = 2  # a pair is two sequences in a batch (for data.static_shapes)

    def tokenize(self, sources):
        return load_samples(sources, self.tokenizer, self.max_length, self.chat_template, self.overlong,
                            self.num_proc, tokenize=tokenize_pairs)  # fmt: skip

    def batch_dataset(self, samples) -> MicroBatchDataset:
        return PairBatchDataset(samples, self.packing, self.tokenizer.pad_token_id)

    def set_reference_logps(self, split: str, values: torch.Tensor) -> None:
        """Give every pair of ``split`` (``train`` or ``val``) its reference log-probabilities, ``values[n]`` (chosen,
        rejected) for the split's sample ``n``; the data loaders made from now on read them as the rows' own."""
        samples = getattr(self, f"{split}_samples").remove_columns(list(REFERENCE_COLUMNS))
        for column, side in zip(REFERENCE_COLUMNS, values.double().unbind(-1)):
            samples = samples.add_column(column, side.tolist())
        setattr(self, f"{split}_samples", samples)
        if split == "val" and self.test_sources is None:
            self.test_samples = samples  # the test set is the validation set then


class PairBatchDataset(MicroBatchDataset):
    """A planned micro-batch of pairs as the tensors of its sequences (padded, or packed into one row), chosen then
    rejected for each pair, with ``reference_logps`` (``[pairs, 2]``, NaN where the data has none) and the pair
    counts (``loss_count``, ``step_loss_count``) of the plan."""

    def __getitem__(self, micro_batch: MicroBatch) -> dict:
        pairs = self.samples[[index for pack in micro_batch.packs for index in pack]]
        sequences = [
            {"input_ids": pairs[f"{side}_input_ids"][pair], "labels": pairs[f"{side}_labels"][pair]}
            for pair in range(len(pairs["length"]))
            for side in SIDES
        ]
        batch = collate_packed(sequences) if self.packing else collate_padded(sequences, self.pad_id)
        batch["reference_logps"] = torch.tensor(list(zip(*(pairs[column] for column in REFERENCE_COLUMNS))))
        batch["loss_count"] = torch.tensor(micro_batch.loss_count)
        batch["step_loss_count"] = torch.tensor(micro_batch.step_loss_count)
        return batch
