"""``data: {class_path: unpaired_preference}``: labelled answers, each micro-batch with the mismatched sequences that
KTO's KL estimate needs, made over the whole optimizer step."""

import torch

from lt_posttrain import (
    IGNORE_INDEX,
    InstructDataModule,
    MicroBatch,
    MicroBatchDataset,
    UserError,
    collate_packed,
    collate_padded,
    load_samples,
)
from lt_posttrain_kto.tokenize import tokenize_labelled


class UnpairedPreferenceDataModule(InstructDataModule):
    """Labelled answers for KTO; the arguments are :class:`~lt_posttrain.InstructDataModule`'s, and the sources'
    ``type`` is ``labelled_completions`` (rows ``{prompt or messages, completion, label}``).

    An answer is one training unit (``loss_count`` 1, so the step's loss is a mean over answers); ``batch_size``
    counts answers (with ``packing``: packed rows of them). KTO's KL estimate pairs each prompt with another row's
    answer: the step's answers, in the plan's order, each after the prompt of the row that follows it (the first's
    after the last's prompt; TRL rotates a micro-batch the same way). These mismatched sequences are made over the
    whole optimizer step, every micro-batch of the accumulation window on every rank, so the estimate, and with it the
    gradient, does not change with the batch size, accumulation or GPU count; the first micro-batch of a step on each
    rank carries them (``kl_batches``: one batch per micro-batch of the rank's step), cut to ``max_length``.
    ``data.static_shapes`` is not supported (the mismatched sequences have other lengths).
    """

    def setup(self, stage: str) -> None:
        if self.static_shapes:
            raise UserError("data.static_shapes: KTO's mismatched sequences (its KL estimate) have lengths of their "
                            "own and are not padded to one shape; set data.static_shapes false")  # fmt: skip
        super().setup(stage)

    def tokenize(self, sources):
        return load_samples(sources, self.tokenizer, self.max_length, self.chat_template, self.overlong,
                            self.num_proc, tokenize=tokenize_labelled)  # fmt: skip

    def batch_dataset(self, samples) -> MicroBatchDataset:
        return LabelledBatchDataset(samples, self.packing, self.tokenizer.pad_token_id, self.max_length)


def mismatched_partners(step_packs) -> dict[int, int]:
    """For each sample of an optimizer step (``MicroBatch.step_packs``), the sample whose answer follows its prompt
    in the KL estimate: the one before it in the step's order, the first taking the last's, as TRL's
    ``(x_1, y_n), (x_2, y_1), ..., (x_n, y_n-1)``."""
    order = [index for pack in step_packs for index in pack]
    return {index: order[position - 1] for position, index in enumerate(order)}


class LabelledBatchDataset(MicroBatchDataset):
    """A planned micro-batch of labelled answers as tensors (padded, or packed into one row), with ``desirable``
    (``[answers]`` bool), the answer counts of the plan (``loss_count``, ``step_loss_count``) and ``kl_batches``: on
    the first micro-batch of its optimizer step, one batch per micro-batch of the rank's step holding each of that
    micro-batch's prompts followed by its mismatched answer (:func:`mismatched_partners`), cut to ``max_length``;
    elsewhere empty."""

    def __init__(self, samples, packing: bool, pad_id: int, max_length: int):
        super().__init__(samples, packing, pad_id)
        self.max_length = max_length

    def __getitem__(self, micro_batch: MicroBatch) -> dict:
        indices = [index for pack in micro_batch.packs for index in pack]
        rows = self.samples[indices]
        batch = self._collate([{"input_ids": ids, "labels": labels}
                               for ids, labels in zip(rows["input_ids"], rows["labels"])])  # fmt: skip
        batch["desirable"] = torch.tensor(rows["desirable"], dtype=torch.bool)
        batch["loss_count"] = torch.tensor(micro_batch.loss_count)
        batch["step_loss_count"] = torch.tensor(micro_batch.step_loss_count)
        batch["kl_batches"] = self._kl_batches(micro_batch) if micro_batch.first_of_step else []
        return batch

    def _collate(self, sequences: list[dict]) -> dict:
        return collate_packed(sequences) if self.packing else collate_padded(sequences, self.pad_id)

    def _kl_batches(self, micro_batch: MicroBatch) -> list[dict]:
        partners = mismatched_partners(micro_batch.step_packs or micro_batch.packs)
        groups = micro_batch.step_micro_batches or (micro_batch.packs,)
        prompts = [index for packs in groups for pack in packs for index in pack]
        needed = sorted(set(prompts) | {partners[index] for index in prompts})
        rows = self.samples[needed]
        row_of = {index: dict(zip(rows, values)) for index, values in zip(needed, zip(*rows.values()))}

        def mismatched(index: int) -> dict:
            prompt, answer = row_of[index], row_of[partners[index]]
            start, answer_start = prompt["answer_start"], answer["answer_start"]
            input_ids = prompt["input_ids"][:start] + answer["input_ids"][answer_start:]
            labels = [IGNORE_INDEX] * start + answer["labels"][answer_start:]
            return {"input_ids": input_ids[: self.max_length], "labels": labels[: self.max_length]}

        return [self._collate([mismatched(index) for pack in packs for index in pack]) for packs in groups]
