"""Losses and log-probabilities of targets: losses return sums, so that the trainer normalises once over the whole
optimizer step; log-probabilities come per token or per sample (the batch contract says where samples end)."""

import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from lt_posttrain.batch import IGNORE_INDEX, Batch, sum_per_sample
from lt_posttrain.training.tiled import TILE_BYTES, tiled_token_logps


def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Flat ``[positions]`` cross-entropy in float32, 0 where the target is ``IGNORE_INDEX``."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )


def token_cross_entropy_sum(
    logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Sum over positions of ``weight * cross_entropy(logits, target)``; positions with target ``-100`` add nothing.

    ``logits`` is ``[..., vocab]``, ``targets`` (already shifted: the token each position predicts) and ``weights``
    are ``[...]``. Computed in float32.
    """
    losses = _token_losses(logits, targets)
    if weights is not None:
        losses = losses * weights.reshape(-1)
    return losses.sum()


def tiled_cross_entropy_sum(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    tile_bytes: int = TILE_BYTES,
) -> torch.Tensor:
    """:func:`token_cross_entropy_sum` of ``head(hidden)`` (softcapped if ``softcap``), the head run a tile of loss
    positions at a time (:func:`~lt_posttrain.training.tiled.tiled_token_logps`): the same sum and gradients without
    the ``[tokens, vocab]`` logits. ``hidden`` is ``[..., hidden_size]``, ``targets`` and ``weights`` ``[...]``."""
    logps = tiled_token_logps(hidden, head, targets, softcap, tile_bytes)
    if weights is not None:
        logps = logps * weights
    return -logps.sum()


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` at each position, in float32; 0 where the target is ``IGNORE_INDEX``.

    Args:
        logits: ``[..., vocab]``.
        targets: ``[...]``, already shifted (the token each position predicts).

    Returns:
        ``targets``' shape.
    """
    return -_token_losses(logits, targets).view(targets.shape)


def sequence_logps(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Each sample's log-probability of its targets: the sum of :func:`token_logps` over its positions, in float32.

    Args:
        logits: the model's output for ``batch``, ``[rows, length, vocab]`` (padded or packed alike).
        batch: its ``targets`` and layout keys.

    Returns:
        ``[samples]``.
    """
    return sum_per_sample(token_logps(logits, batch["targets"]), batch)


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
