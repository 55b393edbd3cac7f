"""Log-probabilities of targets from the final hidden states and the output head, a tile of positions at a time, so
that the ``[tokens, vocab]`` logits are never held whole; and the pieces to do it on a sharded model.

Only the positions that have a target go through the head (a preference pair's prompt does not), a tile of them at a
time; under gradients each tile runs under activation checkpointing, so the backward pass recomputes its logits instead
of keeping them. At any moment one tile's logits (and their gradient) are alive: with a 128k vocabulary and the default
budget, 512 tokens' worth. The tiles run as the head's forward (:func:`run_as_forward`), so a strategy that gathers a
module's weights around its forward (DeepSpeed ZeRO-3, an FSDP unit) has them whole, once for all the tiles, in the
forward pass and again in the backward. A head that is not a plain linear layer (a LoRA adapter on it) is called as a
module a tile at a time instead; under ZeRO-3, which gathers its weights at each call, every rank then runs as many
tiles as the rank with the most (:func:`tiles_on_every_rank`), since each gather is a collective all ranks join.
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
    tile = tile_tokens(head.out_features, tile_bytes)
    if type(head) is nn.Linear:  # its weight gathered once, the tiles computed from it
        logps = run_as_forward(head, lambda inner, *args: _tiled_logps(inner, *args, tile, softcap, linear=True),
                               rows, chosen_targets)  # fmt: skip
    else:
        logps = _tiled_logps(head, rows, chosen_targets, tile, softcap, linear=False)
    out = torch.zeros(flat_targets.shape, dtype=torch.float32, device=hidden.device)
    return out.index_put((positions,), logps).view(targets.shape)


def _tiled_logps(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, tile: int, softcap: Optional[float],
                 linear: bool) -> torch.Tensor:  # fmt: skip
    """``[rows]`` log-probabilities of ``targets``, ``tile`` rows at a time: from the head's weight (``linear``: the
    caller has it whole), or calling the head, as many times on every rank (:func:`tiles_on_every_rank`)."""

    def tile_logps(tile_hidden: torch.Tensor, tile_targets: torch.Tensor) -> torch.Tensor:
        if linear:
            logits = torch.nn.functional.linear(tile_hidden, head.weight, head.bias).float()
            logits = logits if softcap is None else softcap * torch.tanh(logits / softcap)
        else:
            logits = head_logits(head, tile_hidden, softcap)
        return logits.gather(-1, tile_targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)

    count = max(-(-len(rows) // tile), 1)  # an empty tile all the same: the backward reaches the head on every rank
    if not linear:
        count = tiles_on_every_rank(count, head.parameters())  # the extra tiles are empty
    grad = torch.is_grad_enabled()
    pieces = []
    for start in range(0, count * tile, tile):
        part = rows[start : start + tile], targets[start : start + tile]
        pieces.append(checkpoint(tile_logps, *part, use_reentrant=False) if grad else tile_logps(*part))
    return torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)


def tiles_on_every_rank(count: int, parameters) -> int:
    """``count`` tiles, or under DeepSpeed ZeRO-3 (if ``parameters``, those a tile's module reads, are partitioned)
    the most any rank runs: ZeRO-3 gathers a module's weights each time the module runs, and each gather is a
    collective that every rank must join, so every rank must run the module as many times. One all-reduce."""
    parameters = list(parameters)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or not any(hasattr(p, "ds_id") for p in parameters) or torch.distributed.get_world_size() == 1:
        return count
    on_gpu = torch.distributed.get_backend() == "nccl"
    most = torch.tensor([count], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item())


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
