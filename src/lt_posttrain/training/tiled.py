"""Log-probabilities of targets from the final hidden states and the output head, a tile of positions at a time, so
that the ``[tokens, vocab]`` logits are never held whole; and the pieces to do it on a sharded model.

Only the positions that have a target go through the head (a preference pair's prompt does not), a tile of them at a
time; under gradients each tile runs under activation checkpointing, so the backward pass recomputes its logits instead
of keeping them. At any moment one tile's logits (and their gradient) are alive: with a 128k vocabulary and the default
budget, 512 tokens' worth. The head is called as a module, so a strategy that gathers a module's weights around its
forward (DeepSpeed ZeRO-3, an FSDP unit) has them whole; :func:`run_as_forward` runs any code where they are.
"""

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lt_posttrain.batch import IGNORE_INDEX

TILE_BYTES = 256 * 2**20
"""The float32 logits of one tile: tokens per tile = ``TILE_BYTES / (4 * vocab)``."""


def tile_tokens(vocab_size: int, tile_bytes: int = TILE_BYTES) -> int:
    """Tokens per tile for logits of ``vocab_size`` columns within ``tile_bytes`` of float32."""
    return max(1, tile_bytes // (4 * vocab_size))


def head_logits(head: nn.Module, hidden: torch.Tensor, softcap: Optional[float] = None) -> torch.Tensor:
    """``head(hidden)`` in float32, softcapped as ``softcap * tanh(logits / softcap)`` when ``softcap`` is set (as the
    model's own forward does)."""
    logits = head(hidden).float()
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def tiled_token_logps(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    softcap: Optional[float] = None,
    tile_bytes: int = TILE_BYTES,
) -> torch.Tensor:
    """``log p(target)`` at each position, from the final hidden states and the output head, in float32; 0 where the
    target is ``IGNORE_INDEX``. The head runs only at positions with a target, a tile at a time (see the module's
    docstring), so the result and its gradient are those of the full logits without ever holding them.

    Args:
        hidden: ``[..., hidden_size]`` final hidden states (the head's input).
        head: the output head (a module ``hidden -> logits`` with ``out_features``, the vocabulary size).
        targets: ``[...]`` the token each position predicts, ``IGNORE_INDEX`` where none.
        softcap: the model's final logit softcapping, if any.
        tile_bytes: the float32 logits of one tile.

    Returns:
        ``targets``' shape.
    """
    flat_targets = targets.reshape(-1)
    positions = (flat_targets != IGNORE_INDEX).nonzero().squeeze(-1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    chosen_targets = flat_targets.index_select(0, positions)

    def tile_logps(tile_hidden: torch.Tensor, tile_targets: torch.Tensor) -> torch.Tensor:
        logits = head_logits(head, tile_hidden, softcap)
        return logits.gather(-1, tile_targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)

    tile = tile_tokens(head.out_features, tile_bytes)
    pieces = []
    for start in range(0, len(positions), tile):
        part = rows[start : start + tile], chosen_targets[start : start + tile]
        grad = torch.is_grad_enabled()
        pieces.append(checkpoint(tile_logps, *part, use_reentrant=False) if grad else tile_logps(*part))
    logps = torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(flat_targets.shape, dtype=torch.float32, device=hidden.device)
    return out.index_put((positions,), logps).view(targets.shape)


def run_as_forward(module: nn.Module, function: Callable, *args, inner: Optional[nn.Module] = None):
    """``function(inner, *args)`` run as ``module``'s forward: ``module(*args)`` with ``inner``'s forward swapped for
    the call. So the strategy's hooks run around it as around the module's own forward: FSDP unshards the weights of
    ``module``'s unit, DeepSpeed ZeRO-3 gathers those of each submodule ``function`` calls. Lightning runs
    ``training_step`` in the wrapped model's forward the same way (``_ForwardRedirection``).

    Args:
        module: the module to call (FSDP-wrapped, a DeepSpeed engine, or plain).
        function: ``function(inner, *args)``; its result is returned.
        *args: tensors and other arguments for ``function``.
        inner: the module whose forward ``module``'s forward calls (a DeepSpeed engine's ``module``); default: the
            module an FSDP wrapper holds, else ``module`` itself.
    """
    inner = inner if inner is not None else getattr(module, "_fsdp_wrapped_module", module)
    original = inner.__dict__.get("forward")

    def forward(*call_args):
        _restore_forward(inner, original)  # so that the body may call the module as it is
        return function(inner, *call_args)

    inner.forward = forward
    try:
        return module(*args)
    finally:
        _restore_forward(inner, original)


def _restore_forward(module: nn.Module, original) -> None:
    if original is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = original
