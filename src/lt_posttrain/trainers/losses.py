"""Loss functions that return sums, so that the trainer can normalise once over the whole optimizer step."""

from typing import Optional

import torch
import torch.nn.functional as F

from lt_posttrain.data.tokenize import IGNORE_INDEX


def token_cross_entropy_sum(
    logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Sum over positions of ``weight * cross_entropy(logits, target)``; positions with target ``-100`` add nothing.

    ``logits`` is ``[..., vocab]``, ``targets`` (already shifted: the token each position predicts) and ``weights``
    are ``[...]``. Computed in float32.
    """
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    if weights is not None:
        losses = losses * weights.reshape(-1)
    return losses.sum()
