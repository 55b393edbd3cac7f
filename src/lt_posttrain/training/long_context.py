"""Training on long samples (``model.long_context``): what grows with the sequence, each kept from growing whole.

- ``tiled_loss``: the SFT loss from the decoder's final hidden states, the output head run a tile of loss tokens at
  a time (:func:`lt_posttrain.training.tiled.tiled_token_logps`): the ``[tokens, vocab]`` logits never exist, under
  every strategy (unlike Liger's fused loss, which ZeRO-3 and FSDP refuse).

Each option changes how much memory a step holds, never what it computes: the losses and gradients are those of the
run without it (``tests/test_long_context.py``).
"""

from dataclasses import dataclass
from typing import Optional, Union

from lt_posttrain.errors import UserError
from lt_posttrain.model.kernels import logit_scaling, output_head
from lt_posttrain.training.tiled import TILE_BYTES


@dataclass
class LongContext:
    """What a step on a long sample keeps from growing whole; each is off unless set (``long_context: true`` turns
    on every one).

    Args:
        tiled_loss: the loss from the final hidden states and the output head, a tile of loss tokens at a time,
            recomputed in the backward pass: the ``[tokens, vocab]`` logits are never held (one tile's are).
        loss_tile_tokens: loss tokens per tile; default: as many as 256 MiB of float32 logits hold (512 for a
            128k vocabulary).
    """

    tiled_loss: bool = False
    loss_tile_tokens: Optional[int] = None

    def __post_init__(self):
        if self.loss_tile_tokens is not None and self.loss_tile_tokens < 1:
            raise UserError(f"model.long_context.loss_tile_tokens must be 1 or more, got {self.loss_tile_tokens}")

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
        return LongContext(tiled_loss=True)
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
