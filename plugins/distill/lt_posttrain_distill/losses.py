"""The divergence between the teacher's and the student's next-token distributions, per token, and its weighted sum
over the loss tokens computed a tile of tokens at a time from both models' final hidden states, so the ``[tokens,
vocab]`` logits of neither model are ever held whole."""

import math
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]

TILE_BYTES = 256 * 2**20
"""The float32 logits of one model for one tile: tokens per tile = ``TILE_BYTES / (4 * vocab)``."""


def token_divergences(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: Divergence = "jsd",
                      beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """The divergence of each position's next-token distributions, summed over the vocabulary, in float32.

    Both logits are divided by ``temperature`` before the softmax. With ``p`` the teacher's distribution and ``q``
    the student's:

    - ``forward_kl``: ``KL(p || q)``, mean-seeking (the student covers every token the teacher gives weight);
    - ``reverse_kl``: ``KL(q || p)``, mode-seeking;
    - ``jsd``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024, eq. 1), ``beta * KL(p || m) +
      (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``; it tends to the forward KL as ``beta`` goes to
      0 (scaled by ``beta``) and to the reverse KL as ``beta`` goes to 1 (scaled by ``1 - beta``).

    Args:
        student_logits: ``[..., vocab]``.
        teacher_logits: ``[..., vocab]``.
        divergence: which of the three.
        beta: the teacher's weight in the mixture of ``jsd`` (between 0 and 1, exclusive).
        temperature: what both models' logits are divided by.

    Returns:
        ``[...]``.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if divergence == "forward_kl":
        return F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(teacher, student, reduction="none", log_target=True).sum(-1)
    mixture = torch.logsumexp(torch.stack([student + math.log1p(-beta), teacher + math.log(beta)]), dim=0)
    to_teacher = F.kl_div(mixture, teacher, reduction="none", log_target=True).sum(-1)
    to_student = F.kl_div(mixture, student, reduction="none", log_target=True).sum(-1)
    return beta * to_teacher + (1 - beta) * to_student


def tile_tokens(vocab_size: int, tile_bytes: int = TILE_BYTES) -> int:
    """Tokens per tile for float32 logits of ``vocab_size`` columns within ``tile_bytes``."""
    return max(1, tile_bytes // (4 * vocab_size))


def softcapped(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """``softcap * tanh(logits / softcap)``, as a model with final logit softcapping computes its logits."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def tiled_divergence_sum(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Linear,
    teacher_logits: Callable[[int, int], torch.Tensor],
    weights: torch.Tensor,
    divergence: Divergence = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    tile_bytes: int = TILE_BYTES,
) -> torch.Tensor:
    """``sum_t weights[t] * token_divergences(student logits[t], teacher logits[t])`` over the rows of
    ``student_hidden``, a tile of rows at a time: each tile's student logits come from ``student_head``'s weight, its
    teacher logits from ``teacher_logits(start, end)``, and the gradient of the student's hidden states and head is
    computed right there (the loss is a sum, so only its scale is left for the backward pass), so no tile's logits,
    of either model, are kept or computed again.

    Args:
        student_hidden: ``[tokens, student hidden size]``, the student's final hidden states at the loss tokens.
        student_head: the student's output head (its ``weight`` and ``bias`` are read: under a sharding strategy, call
            this where the strategy has them whole).
        teacher_logits: the teacher's logits ``[end - start, vocab]`` of the rows ``start:end`` (run without
            gradients).
        weights: ``[tokens]``, each token's weight.
        divergence, beta, temperature: as :func:`token_divergences`.
        softcap: the student's final logit softcapping, if any (``teacher_logits`` applies the teacher's).
        tile_bytes: the float32 logits of one model for one tile.

    Returns:
        A float32 scalar, differentiable with respect to ``student_hidden`` and the head's weight and bias.
    """
    settings = (divergence, beta, temperature, softcap, tile_tokens(student_head.out_features, tile_bytes))
    return _TiledDivergenceSum.apply(student_hidden, student_head.weight, student_head.bias, weights, teacher_logits,
                                     settings)  # fmt: skip


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the head's matmul: autocast's if on (as ``nn.Linear`` under autocast), else the weight's."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return weight.dtype


class _TiledDivergenceSum(torch.autograd.Function):
    """The weighted divergence sum of :func:`tiled_divergence_sum`, with the gradients of the hidden states, the head's
    weight and its bias computed tile by tile in the forward pass and scaled by the incoming gradient in the backward
    (as Liger's fused linear losses do): the teacher runs once, and only in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, weights, teacher_logits, settings):
        divergence, beta, temperature, softcap, tile = settings
        dtype = _compute_dtype(hidden, weight)
        device_type, autocast = hidden.device.type, torch.is_autocast_enabled(hidden.device.type)
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # summed over tiles in float32 and rounded once, as one matmul over all the tokens would
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        with torch.autocast(device_type, enabled=False):
            matrix = weight.to(dtype)
            for start in range(0, hidden.shape[0], tile):
                end = start + tile
                rows = hidden[start:end].to(dtype)
                logits = rows @ matrix.T
                if bias is not None:
                    logits = logits + bias.to(dtype)
                with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=autocast):
                    teacher = teacher_logits(start, end).float()  # the teacher's head under the caller's autocast
                with torch.enable_grad():
                    student = logits.float().detach().requires_grad_(True)
                    values = token_divergences(softcapped(student, softcap), teacher, divergence, beta, temperature)
                    tile_sum = (values * weights[start:end]).sum()
                    (grad_logits,) = torch.autograd.grad(tile_sum, student)
                total += tile_sum.detach()
                if needs_hidden:
                    grad_hidden[start:end] = (grad_logits.to(dtype) @ matrix).to(hidden.dtype)
                if needs_weight:
                    grad_weight += grad_logits.T @ rows.float()
                if needs_bias:
                    grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_out.float()
        return (
            (grad_hidden * scale.to(grad_hidden.dtype)) if grad_hidden is not None else None,
            (grad_weight * scale).to(weight_dtype) if grad_weight is not None else None,
            (grad_bias * scale).to(bias_dtype) if grad_bias is not None else None,
            None,
            None,
            None,
        )
