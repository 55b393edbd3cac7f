"""Gradient checkpointing of the decoder layers (``model.gradient_checkpointing``): full or selective.

A checkpointed layer keeps its inputs and recomputes the rest of its forward in the backward pass. Selective
checkpointing (torch's ``create_selective_checkpoint_contexts``) keeps, besides, the outputs of chosen operators
from the forward, so the recomputation skips them: those that cost much to recompute and little to store. What a
layer keeps is decided per operator, from its kind and shapes alone (never from a count or a module name), so the
forward and its recomputation decide alike, and so does ``torch.compile`` when it traces the layer.

The checkpoint is ours, not transformers' (``gradient_checkpointing_enable``, which moved from ``__call__`` to
``forward`` between transformers releases): each layer's ``forward`` is replaced on the instance by
:func:`checkpointed_forward`, which a compiled layer traces into (``training/compile.py``), and which a copy of the
model (``copy.deepcopy``) rebinds to the copy's layer.

Memory per token of a Llama layer of hidden size ``h`` (query width ``h``, key/value width ``kv``, MLP width ``i``),
in the weights' dtype: full checkpointing keeps ``h`` (the layer's input); ``attention`` adds ``h`` (and a float per
head); ``attention_projections`` adds ``2h + 2kv``; ``matmuls`` adds ``2h + 2kv + 3i``, near what no checkpointing
keeps.
"""

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Literal, Optional, Union

import torch

from lt_posttrain.errors import UserError
from lt_posttrain.model.layers import decoder_layers

SavedOutput = Literal["attention", "attention_projections", "matmuls"]
SAVED_OUTPUTS = ("attention", "attention_projections", "matmuls")


@dataclass
class GradientCheckpointing:
    """Selective gradient checkpointing (``model.gradient_checkpointing`` as a mapping; ``true`` is this with its
    defaults: every layer checkpointed, nothing else kept).

    Args:
        save: the outputs a checkpointed layer keeps from its forward instead of recomputing them: ``attention``
            (the attention operator's output and softmax statistics: the attention is not run again),
            ``attention_projections`` (the products of the query, key, value and output projections), ``matmuls``
            (every matrix product's output, the MLP's included). Empty: full checkpointing.
        every: checkpoint one decoder layer in ``every``, from the first (1: all of them; 2: every second one; the
            others keep all their activations and recompute nothing).
    """

    save: list[SavedOutput] = field(default_factory=list)
    every: int = 1

    def check(self) -> "GradientCheckpointing":
        """Itself, if its values are valid; else one line (a ``UserError``)."""
        unknown = [name for name in self.save if name not in SAVED_OUTPUTS]
        if unknown:
            raise UserError(f"model.gradient_checkpointing.save: {unknown[0]!r} is not one of "
                            f"{', '.join(SAVED_OUTPUTS)}")  # fmt: skip
        if self.every < 1:
            raise UserError(f"model.gradient_checkpointing.every must be 1 or more, got {self.every}")
        return self


CheckpointOption = Union[bool, GradientCheckpointing]


def checkpoint_options(option: Union[CheckpointOption, dict, None]) -> Optional[GradientCheckpointing]:
    """``model.gradient_checkpointing`` as options (checked: a ``UserError`` names a bad value), or None when off."""
    if isinstance(option, dict):
        option = GradientCheckpointing(**option)
    if option is True:
        option = GradientCheckpointing()
    return option.check() if option else None


def checkpointed_forward(
    layer: torch.nn.Module, forward: Callable, context_fn: Optional[Callable], hooks: Optional[Callable], *args,
    **kwargs,
):  # fmt: skip
    """``forward(*args, **kwargs)`` (``layer``'s own) under non-reentrant checkpointing while ``layer`` trains
    (``context_fn`` makes it selective; the checkpoint runs inside ``hooks()`` if given, see
    :func:`set_checkpoint_hooks`); as it is where nothing will be recomputed (evaluation, no gradients)."""
    if not (layer.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    if hooks is None:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
    with hooks():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def apply_gradient_checkpointing(model: torch.nn.Module, options: GradientCheckpointing) -> list[int]:
    """Checkpoint the decoder layers of ``model`` (:func:`~lt_posttrain.model.layers.decoder_layers`) as
    ``options`` say; returns the indices of the layers checkpointed.

    Raises:
        UserError: a model without decoder layers to checkpoint, or outputs to keep that cannot be told apart.
    """
    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"model.gradient_checkpointing: {type(model).__name__} names no decoder layers "
                        "(_no_split_modules) to checkpoint; set it to false")  # fmt: skip
    context_fn = None
    if options.save:
        # one function for every layer: a compiled layer is then traced once for all of them
        context_fn = partial(torch.utils.checkpoint.create_selective_checkpoint_contexts,
                             save_policy(layers[0], options.save))  # fmt: skip
    chosen = list(range(0, len(layers), options.every))
    for index in chosen:
        layer = layers[index]
        layer.forward = partial(checkpointed_forward, layer, layer.forward, context_fn, None)
    return chosen


def set_checkpoint_hooks(model: torch.nn.Module, hooks: Callable) -> int:
    """Run the checkpoint of each checkpointed decoder layer inside ``hooks()`` (a context manager, such as
    ``torch.autograd.graph.saved_tensors_hooks``: around a non-reentrant checkpoint it sees what the checkpoint
    keeps, the layer's inputs, and nothing the layer saves inside it); returns how many layers."""
    count = 0
    for layer in decoder_layers(model):
        if _is_checkpointed(layer):
            _, forward, context_fn, _ = layer.forward.args
            layer.forward = partial(checkpointed_forward, layer, forward, context_fn, hooks)
            count += 1
    return count


def checkpointed_layers(model: torch.nn.Module) -> list[int]:
    """The indices of the decoder layers :func:`apply_gradient_checkpointing` checkpointed."""
    return [index for index, layer in enumerate(decoder_layers(model)) if _is_checkpointed(layer)]


def _is_checkpointed(layer: torch.nn.Module) -> bool:
    forward = layer.__dict__.get("forward")
    return isinstance(forward, partial) and forward.func is checkpointed_forward


def attention_operators() -> set:
    """The operators whose output is the attention's: torch's varlen flash kernel, the CPU per-sample operator of
    ``model/attention.py``, and SDPA's kernels (a padded batch)."""
    import lt_posttrain.model.attention  # noqa: F401  (registers lt_posttrain::per_sample_attention)

    try:
        import torch.nn.attention.varlen  # noqa: F401  (registers torch_attn::_varlen_attn)
    except ImportError:  # a torch without the varlen kernel
        pass

    names = [("lt_posttrain", "per_sample_attention"), ("torch_attn", "_varlen_attn"),
             ("aten", "_scaled_dot_product_flash_attention"), ("aten", "_scaled_dot_product_efficient_attention"),
             ("aten", "_scaled_dot_product_cudnn_attention"), ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
             ("aten", "_flash_attention_forward"), ("aten", "_efficient_attention_forward")]  # fmt: skip
    found = set()
    for namespace, name in names:
        packet = getattr(getattr(torch.ops, namespace), name, None) if hasattr(torch.ops, namespace) else None
        if packet is not None:
            found.add(packet.default)
    return found


MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _matmul_shape(op, args) -> tuple[int, int]:
    """``(inner, outer)``: the width a matrix product reads and the width it writes (a linear layer's in and out)."""
    first, second = (args[1], args[2]) if op is torch.ops.aten.addmm.default else (args[0], args[1])
    return first.shape[-1], second.shape[-1]


def projection_shapes(layer: torch.nn.Module) -> set[tuple[int, int]]:
    """The ``(inner, outer)`` widths of the attention's projections in a decoder layer: its linear layers under a
    child named like ``self_attn`` or ``attention``.

    Raises:
        UserError: none found, or one with the widths of another linear layer of the decoder layer (an MLP's).
    """
    attention, others = set(), set()
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            shape = (module.in_features, module.out_features)
            child = name.split(".")[0]
            (attention if "attn" in child or "attention" in child else others).add(shape)
    if not attention or attention & others:
        why = "found no attention projections" if not attention else "cannot tell them from the MLP's products"
        raise UserError(f"model.gradient_checkpointing.save: attention_projections: {why} in "
                        f"{type(layer).__name__}; save matmuls instead")  # fmt: skip
    return attention


def save_policy(layer: torch.nn.Module, save: list[str]) -> Callable:
    """The selective-checkpointing policy that keeps the outputs ``save`` names (:class:`GradientCheckpointing`) in
    decoder layers like ``layer`` and recomputes every other operator."""
    from torch.utils.checkpoint import CheckpointPolicy

    kept = attention_operators() if "attention" in save else set()
    every_matmul = "matmuls" in save
    projections = projection_shapes(layer) if "attention_projections" in save and not every_matmul else set()

    def policy(ctx, op, *args, **kwargs):
        if op in kept:
            return CheckpointPolicy.MUST_SAVE
        if op in MATMULS and (every_matmul or _matmul_shape(op, args) in projections):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def describe_checkpointing(checkpointed: list[int], model: torch.nn.Module, options: GradientCheckpointing) -> str:
    """One line for the log: how many layers are checkpointed, and what they keep."""
    kept = f", keeping the outputs of {', '.join(options.save)}" if options.save else ""
    return f"gradient checkpointing: {len(checkpointed)} of {len(decoder_layers(model))} decoder layers{kept}"
