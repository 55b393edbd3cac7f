"""Loss functions that return sums, so that the trainer can normalise once over the whole optimizer step."""

import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from lt_posttrain.batch import IGNORE_INDEX


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


def fused_loss_weighs_tokens() -> bool:
    """Whether the installed Liger's fused loss takes per-token weights correctly: ``reduction="none"`` with the
    per-token gradient folded in before the head's gradient is summed (liger-kernel 0.8.5 and later)."""
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

    return "token_grad_output" in inspect.signature(fused_linear_cross_entropy_forward).parameters


def fused_linear_cross_entropy_sum(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """:func:`token_cross_entropy_sum` of ``hidden @ head_weight.T`` through Liger's fused kernel (GPU), in chunks,
    never building the ``[tokens, vocab]`` logits.

    ``hidden`` is ``[..., hidden_size]``, ``head_weight`` ``[vocab, hidden_size]``, ``targets`` and ``weights`` (needs
    :func:`fused_loss_weighs_tokens`) ``[...]``; ``softcap`` caps the logits as ``softcap * tanh(logits / softcap)``.
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if not torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(head_weight.dtype)  # under autocast Liger casts both; without it they must match
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]).contiguous(), targets.reshape(-1).contiguous()
    if weights is None:
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)
        return loss(head_weight, hidden, targets)
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none", softcap=softcap)
    return (loss(head_weight, hidden, targets) * weights.reshape(-1)).sum()
