"""Before the first step: the memory a step of the longest micro-batch needs on one device, against what the device
(and, for offloaded checkpoints, the host) has. A length that cannot fit is one line before training, with the options
that would cut it, instead of running out of memory at the first long micro-batch.

The estimate (:func:`estimate_step`) counts what a step holds, part by part, for a Llama-like decoder: the weights and
whatever else is on the device before the step (measured), the optimizer's states and the gradients (from the trained
parameters: they are allocated at the first step), the activations the layers keep for the backward pass (each
layer's input under gradient checkpointing, every activation without), the working set of the layer whose backward
runs, and the loss's (the ``[tokens, vocab]`` logits, or one tile of them). The peak is at one end of the backward
pass or the other: at its start every kept activation and the loss's working set are alive, at its end every gradient.

It leans low where it cannot be exact (the transient buffers of kernels, the allocator's fragmentation, a custom
trainer's loss, left out): on an H100 it came from 6% below to 2% above the peaks in BENCHMARKS.md (Llama-3.2-1B
shape, full and LoRA, with and without Liger, ``tests/test_memory.py``), and a run is refused only when the estimate
exceeds what is available by more than :data:`MARGIN`.
"""

import math
from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch

from lt_posttrain.errors import UserError
from lt_posttrain.training.gradient_checkpointing import GradientCheckpointing
from lt_posttrain.training.tiled import TILE_BYTES, tile_tokens

GiB = 2**30
MARGIN = 1.10
"""A step is refused when its estimate exceeds the memory available by more than this factor (a warning below it)."""

LOGIT_BYTES = 12
"""Bytes a logit costs when the logits are computed whole: the float32 log-softmax kept for the backward pass, its
gradient and the gradient of the float32 copy (measured: 11.4 to 11.8 with bf16 logits, Llama-3.2-1B shape)."""

LossKind = Literal["logits", "tiled", "fused", "unknown"]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder that its activations grow with."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> Optional["ModelShape"]:
        """The shape of a transformers config (its text part), or None when it does not say one of the sizes."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        sizes = [getattr(config, key, None) for key in
                 ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads")]
        if not all(isinstance(size, int) and size > 0 for size in sizes):
            return None
        layers, hidden, intermediate, vocab, heads = sizes
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(layers, hidden, intermediate, vocab, heads, kv_heads, head_dim)


@dataclass(frozen=True)
class StepSetup:
    """How a training step runs, as far as its memory goes.

    Args:
        resident: bytes on the device before the first step: the weights, buffers, frozen models (measured).
        trainable: trained parameters (this device's).
        trainable_bytes: bytes of one trained parameter (its dtype).
        optimizer: the optimizer whose states the first step allocates (``model.optimizer``, ``auto`` resolved); None
            when they need not be counted (already allocated, or a strategy's own).
        gradients: whether the trained parameters' gradients are held together (not under
            ``optimizer_in_backward``, which frees each at once, nor when a sharding strategy holds them).
        compute_bytes: bytes of an activation (2 under bf16 autocast or with bf16 weights, 4 in float32).
        residual_bytes: bytes of the residual stream, the layers' inputs (the embeddings' dtype: float32 under
            ``bf16-mixed`` with float32 weights).
        checkpointing: gradient checkpointing of the decoder layers, or None.
        offload: the checkpoints kept in host memory (``model.long_context.offload_checkpoints``).
        loss: ``logits`` (computed whole), ``tiled`` (``model.long_context.tiled_loss``), ``fused`` (Liger's), or
            ``unknown`` (a custom trainer's own loss: not counted).
        loss_tile_bytes: the float32 logits of one tile of the tiled loss.
        mlp_tile_tokens: tokens per tile of the tiled MLP (``model.long_context.tiled_mlp``), or None.
        liger: the Liger kernels applied (``rms_norm`` and ``swiglu`` keep less for the backward pass).
        lora_dropout: per layer, the summed input widths of the attention's and of the MLP's LoRA-adapted linear
            layers with dropout (each keeps its dropped-out input and mask).
    """

    resident: int
    trainable: int = 0
    trainable_bytes: int = 4
    optimizer: Optional[str] = "adamw"
    gradients: bool = True
    compute_bytes: int = 2
    residual_bytes: int = 2
    checkpointing: Optional[GradientCheckpointing] = None
    offload: bool = False
    loss: LossKind = "logits"
    loss_tile_bytes: int = TILE_BYTES
    mlp_tile_tokens: Optional[int] = None
    liger: frozenset = frozenset()
    lora_dropout: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class StepMemory:
    """What a step holds, in bytes, by part; :attr:`device` is its peak on the device.

    Attributes:
        resident: on the device before the step, the optimizer's states included.
        gradients: the trained parameters' gradients, all held at the end of the backward pass.
        kept: the activations the layers keep on the device for the backward pass (their checkpoints, or all).
        layer: the working set of one layer's backward pass (its recomputation under gradient checkpointing).
        loss: the loss's working set (the logits, or one tile's), with the final norm's.
        host: the checkpoints offloaded to host memory.
    """

    resident: int
    gradients: int
    kept: int
    layer: int
    loss: int
    host: int = 0

    @property
    def device(self) -> int:
        """The peak: at the start of the backward pass (what the layers kept, and the loss's or the last layer's
        working set) or at its end (every gradient, and the first layer's working set)."""
        return self.resident + max(self.kept + self.loss, self.kept + self.layer, self.gradients + self.layer)


def optimizer_state_bytes(name: Optional[str], parameter_bytes: int) -> int:
    """Bytes of optimizer state per trained parameter: AdamW's two moments in the parameter's dtype, one more buffer
    for the compensated AdamW on bf16 weights, one byte per moment for the 8-bit ones; 0 for an optimizer it does not
    know (a lower bound)."""
    if name in ("adamw", "adamw_stochastic"):
        return 2 * parameter_bytes
    if name == "adamw_kahan":
        return (3 if parameter_bytes < 4 else 2) * parameter_bytes
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        return 2
    return 0


def estimate_step(shape: ModelShape, tokens: int, setup: StepSetup) -> StepMemory:
    """The memory a training step of a micro-batch of ``tokens`` tokens holds on one device (:class:`StepMemory`).

    Per token of a layer of hidden size ``h``, query width ``q``, key/value width ``kv`` and MLP width ``i`` (``c``
    bytes an activation, ``r`` the residual stream's): each RMSNorm keeps its input (in float32 unless Liger's) and
    output; the attention its rotated queries and keys, the values and its output, ``c(2q + 2kv)``; the MLP its gate,
    up, activation and product, ``4ci`` (``3ci`` with Liger's SwiGLU), none of it with the tiled MLP, whose one tile
    at a time is counted instead; its backward adds the gradients of about two of those (one with Liger's SwiGLU).
    Under gradient checkpointing a checkpointed layer keeps ``rh`` (and what ``save`` names); the loss holds
    :data:`LOGIT_BYTES` per logit when computed whole.
    """
    c, r, h, i = setup.compute_bytes, setup.residual_bytes, shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norm = ((r if "rms_norm" in setup.liger else 4) + c) * h
    lora_attention, lora_mlp = (width * (c + 1) for width in setup.lora_dropout)
    mlp = (3 if "swiglu" in setup.liger else 4) * c * i + lora_mlp
    mlp_gradients = (1 if "swiglu" in setup.liger else 2) * c * i
    tiled = setup.mlp_tile_tokens is not None
    saved = norm + c * (2 * q + 2 * kv) + lora_attention + norm + (0 if tiled else mlp)  # one layer, a token
    transient = max(0 if tiled else mlp_gradients, c * (2 * q + 2 * kv))
    tile = (mlp + mlp_gradients) * min(setup.mlp_tile_tokens, tokens) if tiled else 0

    checkpoint = setup.checkpointing
    checkpointed = math.ceil(shape.layers / checkpoint.every) if checkpoint else 0
    extra = 0  # what a checkpointed layer keeps besides its input (selective checkpointing)
    if checkpoint and "matmuls" in checkpoint.save:
        extra = c * (2 * q + 2 * kv) + (0 if tiled else 3 * c * i)
    elif checkpoint and "attention_projections" in checkpoint.save:
        extra = c * (2 * q + 2 * kv)
    if checkpoint and "attention" in checkpoint.save:
        extra += c * q + 4 * shape.heads
    inputs = checkpointed * r * h * tokens
    kept = (shape.layers - checkpointed) * saved * tokens + checkpointed * extra * tokens
    host = 0
    if setup.offload and checkpointed:
        kept, host = kept + 2 * r * h * tokens, inputs  # the layer's input being brought back, and the next one's
    else:
        kept += inputs
    layer = (saved * tokens if checkpointed else 0) + transient * tokens + tile

    final = norm * tokens  # the final norm's, its output the head's input
    tile_logits = shape.vocab * min(tokens, tile_tokens(shape.vocab, setup.loss_tile_bytes))
    loss = {
        "logits": LOGIT_BYTES * shape.vocab * tokens,
        # the loss positions' hidden states and their gradient; a tile's float32 logits, log-softmax and gradient
        "tiled": 2 * c * h * tokens + 3 * 4 * tile_logits,
        "fused": (2 * c + 4) * h * tokens,  # Liger's: the hidden states' gradient and a chunk of about as many logits
        "unknown": 0,
    }[setup.loss] + final
    states = setup.trainable * optimizer_state_bytes(setup.optimizer, setup.trainable_bytes)
    gradients = setup.trainable * setup.trainable_bytes if setup.gradients else 0
    return StepMemory(setup.resident + states, gradients, kept, layer, loss, host)


def cuts(shape: ModelShape, tokens: int, setup: StepSetup, host_budget: Optional[int] = None):
    """The options not yet on that would cut a step's peak, in the order that cuts the most first, each with what it
    saves once the ones before it are on (``[(key, bytes)]``), and the setup with them all on. Offloading is left out
    when its checkpoints would exceed ``host_budget`` bytes."""
    options = {}
    if setup.loss == "logits":
        options["model.long_context.tiled_loss"] = {"loss": "tiled"}
    if setup.mlp_tile_tokens is None:
        options["model.long_context.tiled_mlp"] = {"mlp_tile_tokens": shape.hidden}
    if not setup.checkpointing:
        options["model.gradient_checkpointing"] = {"checkpointing": GradientCheckpointing()}
    offload = {"offload": True, "checkpointing": setup.checkpointing or GradientCheckpointing()}
    if not setup.offload and (host_budget is None or estimate_step(shape, tokens, replace(setup, **offload)).host
                              <= host_budget):  # fmt: skip
        options["model.long_context.offload_checkpoints"] = offload
    steps, current = [], setup
    while options:
        now = estimate_step(shape, tokens, current).device
        peaks = {key: estimate_step(shape, tokens, replace(current, **change)).device
                 for key, change in options.items()}  # fmt: skip
        key = min(peaks, key=peaks.get)
        if peaks[key] >= now:
            break
        steps.append((key, now - peaks[key]))
        current = replace(current, **options.pop(key))
    return steps, current


def check_step(shape: ModelShape, tokens: int, setup: StepSetup, available: int,
               host_available: Optional[int] = None, device: str = "the device",
               processes_per_host: int = 1) -> tuple[StepMemory, Optional[str]]:  # fmt: skip
    """The estimate of a step of ``tokens`` tokens (:func:`estimate_step`), and a warning when it exceeds what is
    available by less than :data:`MARGIN` (None when it fits).

    Args:
        available: bytes the device can hold (in use by this process, and free).
        host_available: bytes of host memory available (``MemAvailable``), for offloaded checkpoints; None: unknown.
        device: the device's name, for the message.
        processes_per_host: training processes on this host, each offloading its own checkpoints.

    Raises:
        UserError: the estimate exceeds ``available`` (or the offloaded checkpoints ``host_available``) by more than
            :data:`MARGIN`; one line with the estimate and the options that would cut it.
    """
    memory = estimate_step(shape, tokens, setup)
    host = memory.host * processes_per_host
    longest = f"the longest micro-batch ({tokens:,} tokens)"
    shorter = "lower data.max_length or data.batch_size"
    escape = "(or set model.long_context.check_memory false)"
    if host_available is not None and host > MARGIN * host_available:
        raise UserError(
            f"{longest} offloads about {_gib(host)} GiB of checkpoints to host memory "
            f"(model.long_context.offload_checkpoints, {processes_per_host} process(es) on this host), and "
            f"{_gib(host_available)} GiB is available: {shorter} {escape}"
        )
    if memory.device > MARGIN * available:
        budget = None if host_available is None else host_available // processes_per_host
        steps, every = cuts(shape, tokens, setup, budget)
        best = estimate_step(shape, tokens, every)
        turn_on = ", then ".join(f"{key} (-{_gib(saving)} GiB)" for key, saving in steps)
        on_host = f", and {_gib(best.host * processes_per_host)} GiB of host memory" if best.host else ""
        if not steps:
            advice = shorter
        elif best.device <= available:
            advice = f"turn on {turn_on}: about {_gib(best.device)} GiB{on_host}; or {shorter}"
        else:
            advice = f"{shorter}: even with {turn_on} a step needs about {_gib(best.device)} GiB"
        raise UserError(
            f"{longest} needs about {_gib(memory.device)} GiB of GPU memory a step ({describe(memory)}) and {device} "
            f"has {_gib(available)} GiB: {advice} {escape}"
        )
    if memory.device > available or (host_available is not None and host > host_available):
        return memory, (f"{longest} may not fit: a step needs about {_gib(memory.device)} GiB of GPU memory "
                        f"({describe(memory)}), {device} has {_gib(available)} GiB"
                        + (f"; {_gib(host)} GiB of offloaded checkpoints, {_gib(host_available)} GiB of host memory "
                           "available" if host and host_available is not None else ""))  # fmt: skip
    return memory, None


def describe(memory: StepMemory) -> str:
    """``"weights and optimizer 15.2, gradients 0.2, kept activations 4.0, loss 150.3, one layer 12.2 GiB"``."""
    parts = [("weights and optimizer", memory.resident), ("gradients", memory.gradients),
             ("kept activations", memory.kept), ("loss", memory.loss), ("one layer", memory.layer)]  # fmt: skip
    return ", ".join(f"{name} {_gib(value)}" for name, value in parts) + " GiB"


def _gib(value: int) -> str:
    return f"{value / GiB:.1f}" if value >= GiB else f"{value / GiB:.2g}"


def setup_of(model: torch.nn.Module, resident: int, precision: str, **options) -> StepSetup:
    """The :class:`StepSetup` of ``model`` as it is placed for training: the trained parameters, the activations'
    and the residual stream's bytes (from ``precision``, Lightning's ``trainer.precision``, and the embeddings'
    dtype), and the LoRA dropout of its first decoder layer; ``options`` the other fields."""
    from lt_posttrain.model.layers import decoder_layers

    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    residual = model.get_input_embeddings().weight.element_size()
    widths = [0, 0]  # the attention's and the MLP's LoRA-adapted inputs with dropout
    for name, module in (decoder_layers(model) or [torch.nn.Module()])[0].named_modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict) and isinstance(getattr(module, "in_features", None), int):
            if any(isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 for dropout in dropouts.values()):
                widths["mlp" in name.split(".")] += module.in_features
    return StepSetup(
        resident=resident, trainable=sum(parameter.numel() for parameter in trained),
        trainable_bytes=trained[0].element_size() if trained else 4,
        compute_bytes=2 if "16" in str(precision) else residual, residual_bytes=residual,
        lora_dropout=(widths[0], widths[1]), **options,
    )  # fmt: skip


# -- what the device and the host have ----------------------------------------------------------------------------
def device_memory(device: torch.device) -> Optional[tuple[int, int]]:
    """``(in use, available)`` bytes of a CUDA device for this process: what its tensors hold now, and that plus
    the device's free memory and what torch's allocator has cached unused; None off CUDA (a CPU's memory is the
    host's, which this does not judge)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return torch.cuda.memory_allocated(device), free + torch.cuda.memory_reserved(device)


def host_available() -> Optional[int]:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
