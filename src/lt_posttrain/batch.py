"""The batch contract: what a trainer's ``loss(batch)`` receives, and the questions asked of it (is it packed, where
does each sample start and end). The ground floor: it imports nothing of ours, and nothing else guesses the layout
from the keys.

A micro-batch comes in one of two layouts (``data.packing``):

- padded: ``[samples, longest]`` tensors, right-padded, with an ``attention_mask`` (1 on tokens, 0 on padding);
- packed: one ``[1, total]`` row of all samples back to back, without padding: ``position_ids`` restart at each
  sample and ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 cumulative lengths, ``[samples + 1]``) and
  ``max_length_q``/``max_length_k`` mark the sample boundaries, so each sample attends only to itself.

With ``data.static_shapes`` every micro-batch of a loader has the same shapes and integers (so a compiled layer is
compiled once): a padded batch has a fixed number of rows of a fixed width, the rows after its samples all padding;
a packed row has a fixed number of tokens, its samples followed by padding samples (targets ``IGNORE_INDEX``) and
zero-length ones up to a fixed count of boundaries, and fixed ``max_length_q``/``max_length_k``. ``num_samples``
then says how many samples are real: the functions below count only those.
"""

from typing import TypedDict

import torch

IGNORE_INDEX = -100
"""The label (and target) of a position that adds nothing to the loss."""

PACKED_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
"""The keys that only a packed batch has: the model's inputs that mark where each sample starts."""


class Batch(TypedDict, total=False):
    """The keys of a micro-batch (see the module's docstring for the two layouts).

    Always: ``input_ids`` (``[rows, length]`` int64), ``targets`` (the same shape: the token each position predicts,
    shifted inside each sample, :data:`IGNORE_INDEX` where no loss), ``num_tokens`` (non-padding tokens, a 0-d
    tensor). From the data plan: ``loss_count`` (what this micro-batch's loss is a sum over: loss tokens for SFT,
    pairs for DPO) and ``step_loss_count`` (the same over this rank's share of the optimizer step; the trainer sums
    it over ranks and divides by it). Optional: ``target_weights`` (``targets``' shape, float: scales each
    position's loss; present when a source has a ``weight`` column).

    Padded only: ``attention_mask``. Packed only: :data:`PACKED_KEYS`. Static shapes only: ``num_samples`` (an
    int: the samples before the padding ones). A plugin's data module may add keys of its own
    (DPO adds ``reference_logps``); ``predict`` batches hold ``input_ids``, ``attention_mask``, ``prompt`` and
    ``reference`` instead.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    num_tokens: torch.Tensor
    loss_count: torch.Tensor
    step_loss_count: torch.Tensor
    target_weights: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seq_lens_q: torch.Tensor
    cu_seq_lens_k: torch.Tensor
    max_length_q: int
    max_length_k: int
    num_samples: int


def is_packed(batch: Batch) -> bool:
    """Whether ``batch`` holds its samples back to back in one row (else one sample a row, padded)."""
    return "cu_seq_lens_q" in batch


def sample_count(batch: Batch) -> int:
    """How many samples ``batch`` holds, padding samples left out (read from shapes: no wait for the device)."""
    if "num_samples" in batch:
        return batch["num_samples"]
    return _slots(batch)


def _slots(batch: Batch) -> int:
    """Samples, padding ones included: the boundaries of a packed row, the rows of a padded batch."""
    return len(batch["cu_seq_lens_q"]) - 1 if is_packed(batch) else batch["input_ids"].shape[0]


def sample_lengths(batch: Batch) -> torch.Tensor:
    """``[samples]``: the tokens of each sample, padding left out."""
    count = sample_count(batch)
    if is_packed(batch):
        return batch["cu_seq_lens_q"][: count + 1].diff()
    if "attention_mask" in batch:
        return batch["attention_mask"][:count].sum(dim=-1)
    input_ids = batch["input_ids"]
    return torch.full((count,), input_ids.shape[-1], device=input_ids.device)


def sample_ids(batch: Batch) -> torch.Tensor:
    """``targets``' shape: the sample each position belongs to (padded: its row; padding belongs to its row's
    sample, with target :data:`IGNORE_INDEX`; the positions of padding samples get numbers from
    :func:`sample_count` up)."""
    targets = batch["targets"]
    if not is_packed(batch):
        return torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)
    lengths = batch["cu_seq_lens_q"].diff().to(targets.device)
    samples = torch.arange(len(lengths), device=targets.device)
    # output_size: the boundaries cover every position of the row (padding samples too), so the result's size is
    # known without asking the device
    return torch.repeat_interleave(samples, lengths, output_size=targets.numel()).view_as(targets)


def sum_per_sample(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``[samples]``: the sum of ``values`` (one per position, ``targets``' shape) over each sample's positions."""
    count = sample_count(batch)
    if not is_packed(batch):
        return values[:count].sum(dim=-1)
    sums = values.new_zeros(_slots(batch)).index_add(0, sample_ids(batch).flatten(), values.flatten())
    return sums[:count]
