"""Training on long samples (``model.long_context``): what grows with the sequence, each kept from growing whole.

- ``tiled_loss``: the SFT loss from the decoder's final hidden states, the output head run a tile of loss tokens at
  a time (:func:`lt_posttrain.training.tiled.tiled_token_logps`): the ``[tokens, vocab]`` logits never exist, under
  every strategy (unlike Liger's fused loss, which ZeRO-3 and FSDP refuse).
- ``tiled_mlp``: each decoder layer's MLP run a tile of tokens at a time, forward and backward
  (:class:`TiledMLPForward`): its ``[tokens, intermediate]`` activations exist for one tile at a time.

Each option changes how much memory a step holds, never what it computes: the losses and gradients are those of the
run without it (``tests/test_long_context.py``).
"""

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lt_posttrain.errors import UserError
from lt_posttrain.model.kernels import decoder_of, logit_scaling, output_head
from lt_posttrain.training.tiled import TILE_BYTES


@dataclass
class LongContext:
    """What a step on a long sample keeps from growing whole; each is off unless set (``long_context: true`` turns
    on every one).

    Args:
        tiled_loss: the loss from the final hidden states and the output head, a tile of loss tokens at a time,
            recomputed in the backward pass: the ``[tokens, vocab]`` logits are never held (one tile's are).
        tiled_mlp: each decoder layer's MLP run a tile of tokens at a time, and each tile recomputed in the
            backward pass: its ``[tokens, intermediate]`` activations are never held whole.
        loss_tile_tokens: loss tokens per tile; default: as many as 256 MiB of float32 logits hold (512 for a
            128k vocabulary).
        mlp_tile_tokens: tokens per MLP tile; default: the model's hidden size (DeepSpeed's and Liger's choice, so a
            tile's intermediate activations weigh about as much as one of the MLP's weights).
    """

    tiled_loss: bool = False
    tiled_mlp: bool = False
    loss_tile_tokens: Optional[int] = None
    mlp_tile_tokens: Optional[int] = None

    def __post_init__(self):
        for key in ("loss_tile_tokens", "mlp_tile_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"model.long_context.{key} must be 1 or more, got {value}")

    def loss_tile_bytes(self, vocab_size: int) -> int:
        """The ``tile_bytes`` of :func:`~lt_posttrain.training.tiled.tiled_token_logps` for ``loss_tile_tokens``."""
        return TILE_BYTES if self.loss_tile_tokens is None else 4 * vocab_size * self.loss_tile_tokens


LongContextOption = Union[bool, LongContext]


def long_context_options(value: Union[LongContextOption, dict, None]) -> LongContext:
    """The :class:`LongContext` of a recipe's ``model.long_context``: ``true`` every option, ``false`` or absent
    none, a mapping or a :class:`LongContext` those it sets."""
    if isinstance(value, LongContext):
        return value
    if isinstance(value, dict):
        return LongContext(**value)
    if value is True:
        return LongContext(tiled_loss=True, tiled_mlp=True)
    return LongContext()


def check_tiled_loss(model) -> None:
    """Refuse, in one line, a model whose logits the tiled loss cannot compute from its head: logits scaled by the
    architecture (Granite, Cohere), or a head without ``out_features``."""
    head, _ = output_head(model)
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    scaling = logit_scaling(config)
    if scaling:
        raise UserError(f"model.long_context.tiled_loss: {config.model_type} scales its logits ({scaling}), which "
                        "the tiled loss does not; set it to false")  # fmt: skip
    if not isinstance(getattr(head, "out_features", None), int):
        raise UserError(f"model.long_context.tiled_loss: the output head is a {type(head).__name__} without "
                        "out_features (the vocabulary size); set it to false")  # fmt: skip


class TiledMLPForward:
    """An MLP's forward run a tile of tokens at a time, each tile under non-reentrant activation checkpointing: the
    forward keeps only each tile's input (a view of the MLP's input) and output, and the backward recomputes one tile's
    intermediate activations at a time. An MLP is position-wise, so the output is the untiled one's.

    Why checkpointing rather than DeepSpeed's ``TiledMLP`` or Liger's ``LigerTiledMLPFunction`` (an autograd function
    whose backward runs one backward per tile, each adding to the weights' ``.grad``): there, every weight's gradient
    is accumulated once per tile, and a data-parallel strategy acts on each accumulation. DeepSpeed marks its weights
    (``ds_grad_is_ready``) so that ZeRO waits for the last tile; Liger adds ``no_sync`` for DDP and FSDP wrappers it can
    find; under torch's own DDP the scheme raises "Expected to mark a variable ready only once" (tried with two gloo
    ranks). Here the tiles are ordinary nodes of the autograd graph, so the engine sums each weight's gradient over
    the tiles before accumulating it once: DDP, DeepSpeed ZeRO-1/2/3 and FSDP see the backward of an untiled MLP,
    with no strategy-specific code. The cost is the same as theirs: the MLP's forward runs twice a step (three times
    under gradient checkpointing, whose recomputation of the layer runs it once more).

    Args:
        forward: the MLP's own forward (bound), ``hidden_states [..., hidden] -> [..., hidden]``.
        tokens: tokens per tile; an input of at most this many runs untiled.
    """

    def __init__(self, forward: Callable, tokens: int):
        self.forward, self.tokens = forward, tokens

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        if args or kwargs or rows.shape[0] <= self.tokens:
            return self.forward(hidden_states, *args, **kwargs)
        grad = torch.is_grad_enabled()
        pieces = [checkpoint(self.forward, tile, use_reentrant=False) if grad else self.forward(tile)
                  for tile in rows.split(self.tokens)]  # fmt: skip
        if not all(isinstance(piece, torch.Tensor) for piece in pieces):
            raise UserError(f"model.long_context.tiled_mlp: the MLP's forward returns a {type(pieces[0]).__name__}, "
                            "not a tensor of its input's tokens; set it to false")  # fmt: skip
        # cat, not writes into one output: its backward hands each tile a view of the gradient (in-place writes would
        # copy the whole gradient once per tile)
        return torch.cat(pieces).view(*hidden_states.shape[:-1], -1)


def tile_mlps(model, tokens: Optional[int] = None) -> int:
    """Run the MLP of each decoder layer of ``model`` (PEFT-wrapped or not) a tile of ``tokens`` tokens at a time
    (:class:`TiledMLPForward`; default: the hidden size), as its instance's ``forward``: the weights, their names and
    the state dict are unchanged. Returns the number of MLPs tiled.

    Raises:
        UserError: the decoder has no ``layers``, or a layer no ``mlp`` module.
    """
    decoder = decoder_of(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UserError(f"model.long_context.tiled_mlp: the decoder ({type(decoder).__name__}) has no list of layers "
                        "whose MLPs could be tiled; set it to false")  # fmt: skip
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    tokens = tokens or config.get_text_config().hidden_size
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise UserError(f"model.long_context.tiled_mlp: decoder layer {index} ({type(layer).__name__}) has no mlp "
                            "module to tile; set it to false")  # fmt: skip
        if not isinstance(mlp.forward, TiledMLPForward):
            mlp.forward = TiledMLPForward(mlp.forward, tokens)
    return len(layers)
