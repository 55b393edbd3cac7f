"""Stage 4c: the samples of a micro-batch become tensors, padded or packed into one padding-free row.

Both layouts carry ``targets``: the token each position must predict (``-100`` where no loss), shifted inside each
sample so that a packed sample never predicts the next one's first token.

With ``data.static_shapes``, :func:`pad_to_static` then pads each batch to the one :class:`StaticShape` of its data
loader (:func:`static_shape`), so every step has the same tensor shapes and the same ``max_length_q/k``.
"""

import math
from dataclasses import dataclass

import torch

from lt_posttrain.batch import IGNORE_INDEX, is_packed


def _targets(labels: list[int]) -> list[int]:
    return labels[1:] + [IGNORE_INDEX]


def _weights(samples: list[dict]) -> list[list[float]] | None:
    """Each position's loss weight: the sample's ``weight`` times the ``token_weights`` of the token it predicts
    (shifted as the targets are)."""
    if not any("weight" in sample or "token_weights" in sample for sample in samples):
        return None
    weights = []
    for sample in samples:
        weight = float(sample.get("weight", 1.0))
        per_token = sample.get("token_weights")
        if per_token is None:
            weights.append([weight] * len(sample["input_ids"]))
        else:
            weights.append([weight * value for value in per_token[1:]] + [0.0])
    return weights


def collate_padded(samples: list[dict], pad_id: int) -> dict:
    """``[batch, longest]`` tensors, right-padded, with an ``attention_mask``."""
    width = max(len(sample["input_ids"]) for sample in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        length = len(sample["input_ids"])
        input_ids[row, :length] = torch.tensor(sample["input_ids"])
        targets[row, :length] = torch.tensor(_targets(sample["labels"]))
        attention_mask[row, :length] = 1
    batch = {"input_ids": input_ids, "targets": targets, "attention_mask": attention_mask}
    weights = _weights(samples)
    if weights is not None:
        batch["target_weights"] = torch.zeros((len(samples), width))
        for row, values in enumerate(weights):
            batch["target_weights"][row, : len(values)] = torch.tensor(values)
    batch["num_tokens"] = torch.tensor(int(attention_mask.sum()))
    return batch


def collate_packed(samples: list[dict]) -> dict:
    """One ``[1, total]`` row of all samples back to back: ``position_ids`` restart per sample and
    ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 cumulative lengths) and ``max_length_q``/``max_length_k`` mark the
    sample boundaries for per-sample attention."""
    lengths = [len(sample["input_ids"]) for sample in samples]
    input_ids = torch.tensor([token for sample in samples for token in sample["input_ids"]]).unsqueeze(0)
    targets = torch.tensor([token for sample in samples for token in _targets(sample["labels"])]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(length) for length in lengths]).unsqueeze(0)
    cu_seq_lens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.tensor(lengths).cumsum(0)
    batch = {
        "input_ids": input_ids,
        "targets": targets,
        "position_ids": position_ids,
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
        "num_tokens": torch.tensor(sum(lengths)),
    }
    weights = _weights(samples)
    if weights is not None:
        batch["target_weights"] = torch.tensor([value for values in weights for value in values]).unsqueeze(0)
    return batch


@dataclass(frozen=True)
class StaticShape:
    """The one shape every micro-batch of a data loader is padded to (``data.static_shapes``).

    Args:
        tokens: packed: tokens of the row; padded: the width of each row.
        samples: packed: samples the boundaries mark (``cu_seq_lens_q`` has ``samples + 1`` entries), padding and
            zero-length ones included; padded: rows.
        longest: packed: ``max_length_q`` and ``max_length_k`` of every batch (no sample, padding ones included,
            is longer).
    """

    tokens: int
    samples: int
    longest: int


def static_shape(lengths: list[int], packs: list[list[int]], batch_size: int, packing: bool,
                 sequences_per_sample: int = 1) -> StaticShape:  # fmt: skip
    """The static shape that holds every micro-batch that ``batch_size`` of ``packs`` can make, in any order.

    Packed: the tokens of the ``batch_size`` fullest packs (at most ``batch_size x max_length``), the longest
    sample, and room for the samples of the ``batch_size`` packs that hold the most plus the padding samples (each
    at most the longest sample's length, so none raises ``max_length_q``). Padded: ``batch_size`` rows as wide as
    the longest sample.

    Args:
        lengths: tokens of each training sample (a pair's tokens for preference data).
        packs: sample indices per pack (one sample per pack when not packing).
        batch_size: packs per micro-batch.
        packing: the packed layout (else padded).
        sequences_per_sample: sequences a training sample becomes in a batch (2 for a preference pair).
    """
    longest = max(lengths, default=1)
    if not packing:
        return StaticShape(tokens=longest, samples=batch_size * sequences_per_sample, longest=longest)
    fullest = sorted(sum(lengths[index] for index in pack) for pack in packs)[-batch_size:]
    most = sorted(len(pack) for pack in packs)[-batch_size:]
    tokens = max(sum(fullest), 1)
    return StaticShape(tokens, sum(most) * sequences_per_sample + math.ceil(tokens / longest), longest)


def pad_to_static(batch: dict, shape: StaticShape, pad_id: int) -> dict:
    """``batch`` (from :func:`collate_packed` or :func:`collate_padded`) padded to ``shape``, with ``num_samples``
    (its samples before the padding). Packed: padding samples of at most ``shape.longest`` tokens (token ``pad_id``,
    positions from 0, no target) fill the row, then zero-length samples the boundaries, and ``max_length_q/k`` become
    ``shape.longest``. Padded: rows of ``pad_id`` (their first position unmasked, so no attention row is empty) and
    columns of padding. Other keys are kept as they are.

    Raises:
        ValueError: ``batch`` does not fit in ``shape`` (a shape computed for other data).
    """
    if "num_samples" in batch:
        return batch
    return _pad_packed(batch, shape, pad_id) if is_packed(batch) else _pad_padded(batch, shape, pad_id)


def _pad_packed(batch: dict, shape: StaticShape, pad_id: int) -> dict:
    bounds = batch["cu_seq_lens_q"]
    total, samples = batch["input_ids"].shape[1], len(bounds) - 1
    padding = shape.tokens - total
    chunks = [shape.longest] * (padding // shape.longest) + ([padding % shape.longest] if padding % shape.longest else [])
    if padding < 0 or samples + len(chunks) > shape.samples or batch["max_length_q"] > shape.longest:
        raise ValueError(f"a packed micro-batch of {total} tokens in {samples} samples (the longest "
                         f"{batch['max_length_q']}) does not fit the static shape {shape}")  # fmt: skip
    out = dict(batch, num_samples=samples, max_length_q=shape.longest, max_length_k=shape.longest)
    out["input_ids"] = _extend(batch["input_ids"], padding, pad_id)
    out["targets"] = _extend(batch["targets"], padding, IGNORE_INDEX)
    if "target_weights" in batch:
        out["target_weights"] = _extend(batch["target_weights"], padding, 0.0)
    out["position_ids"] = torch.cat([batch["position_ids"], *(torch.arange(n).unsqueeze(0) for n in chunks)], dim=1)
    ends = (torch.tensor(chunks).cumsum(0) + total).to(bounds.dtype) if chunks else bounds.new_empty(0)
    cu_seq_lens = torch.cat([bounds, ends, bounds.new_full((shape.samples - samples - len(chunks),), shape.tokens)])
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu_seq_lens
    return out


def _extend(row: torch.Tensor, count: int, value) -> torch.Tensor:
    return torch.cat([row, row.new_full((row.shape[0], count), value)], dim=1)


def _pad_padded(batch: dict, shape: StaticShape, pad_id: int) -> dict:
    rows, width = batch["input_ids"].shape
    if rows > shape.samples or width > shape.tokens:
        raise ValueError(f"a padded micro-batch of {rows} rows of {width} tokens does not fit the static shape {shape}")
    out = dict(batch, num_samples=rows)
    fill = {"input_ids": pad_id, "targets": IGNORE_INDEX, "attention_mask": 0, "target_weights": 0.0}
    for key, value in fill.items():
        if key in batch:
            out[key] = batch[key].new_full((shape.samples, shape.tokens), value)
            out[key][:rows, :width] = batch[key]
    out["attention_mask"][rows:, 0] = 1  # a row of padding attends to its first token: no empty softmax
    return out
