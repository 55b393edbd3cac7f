"""The next token of every position of a padded or packed batch: the targets of a loss on every token, prompt
included (ORPO's supervised term, as its authors and TRL compute it)."""

import torch

from lt_posttrain import IGNORE_INDEX, Batch, is_packed


def next_token_targets(batch: Batch) -> torch.Tensor:
    """The token each position is followed by within its sample, ``IGNORE_INDEX`` at a sample's last token and on
    padding (``batch["input_ids"]``' shape)."""
    input_ids = batch["input_ids"]
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    if is_packed(batch):
        ends = batch["cu_seq_lens_q"][1:].to(input_ids.device).long() - 1
        targets[0, ends] = IGNORE_INDEX
    else:
        targets[:, :-1] = targets[:, :-1].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE_INDEX)
    return targets
