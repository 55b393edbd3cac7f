"""Stage 4c: the samples of a micro-batch become tensors, padded or packed into one padding-free row.

Both layouts carry ``targets``: the token each position must predict (``-100`` where no loss), shifted inside each
sample so that a packed sample never predicts the next one's first token.
"""

import torch

from lt_posttrain.batch import IGNORE_INDEX


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
