"""Compiled decoder layers (``model.compile``): each decoder layer compiled by ``torch.compile``, once for all
layers and steps.

A layer is compiled, not the whole model: the layers share one graph (their code is the same, and torch passes each
layer's weights as inputs), so the compile time is one layer's, and the loss, the output head and the optimizer stay
as they are. Shapes are static (``dynamic=False``): every tensor and integer a layer gets must be the same at every
step, which ``data.static_shapes`` guarantees for a packed row (its tokens, its padded boundaries, the longest sample
as ``max_length_q/k``); only the boundaries' values change, and the attention operators read them on the device
(``torch_attn::_varlen_attn`` on the GPU, ``lt_posttrain::per_sample_attention`` on the CPU: both opaque operators
with their shapes known without running them, so the graph neither breaks nor depends on them).

A checkpointed layer (``training/gradient_checkpointing.py``) is compiled with its checkpoint inside: the compiler
sees the forward and the recomputation as one graph, and honours a selective policy.

``cuda_graphs`` also captures each compiled layer's kernels as CUDA graphs (``mode="reduce-overhead"``), so the
launches of a layer's small kernels cost one launch.
"""

import os
import shutil
from typing import Any, Literal, Optional, Union

import torch

from lt_posttrain.errors import UserError
from lt_posttrain.model.layers import decoder_layers
from lt_posttrain.training.gradient_checkpointing import checkpointed_layers
from lt_posttrain.training.strategy import DEEPSPEED, FSDP, distribution

Compile = Union[bool, Literal["layers", "cuda_graphs"]]
LAYERS, CUDA_GRAPHS = "layers", "cuda_graphs"
SKIP_SIDE_EFFECTS = "skip_fwd_side_effects_in_bwd_under_checkpoint"
BACKEND_VARIABLE = "LT_POSTTRAIN_COMPILE_BACKEND"  # inductor unless set: tests name aot_eager or a counting backend


def compile_mode(option: Compile) -> Optional[str]:
    """``layers``, ``cuda_graphs``, or None when off (``true`` is ``layers``)."""
    if option is True:
        return LAYERS
    return option or None


def backend() -> str:
    """The ``torch.compile`` backend: ``inductor``, unless the environment variable ``LT_POSTTRAIN_COMPILE_BACKEND``
    names another (``aot_eager``: the same graphs without generated kernels, fast to build on a small CPU)."""
    return os.environ.get(BACKEND_VARIABLE, "inductor")


def why_not_compiled(strategy: Any, device: torch.device) -> Optional[str]:
    """Why the layers cannot be compiled here (one line), or None when they can."""
    family = distribution(strategy).family
    if family in (DEEPSPEED, FSDP):
        return (f"not under {'DeepSpeed' if family == DEEPSPEED else 'FSDP'}, whose hooks on every weight the compiled "
                "graph cannot hold; use one device or DDP")  # fmt: skip
    if device.type not in ("cpu", "cuda"):
        return f"not on {device.type} (CPU or CUDA only)"
    if backend() != "inductor":
        return None
    compilers = (os.environ.get("CXX", "g++"), "c++", "clang++")
    if device.type == "cpu" and not any(shutil.which(name) for name in compilers):
        return "on the CPU torch.compile needs a C++ compiler (g++ or clang++), and none is on the PATH"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "on the GPU torch.compile needs Triton (pip install triton)"
    return None


def check_static_shapes(datamodule: Any) -> None:
    """Refuse in one line a data module that varies its batches' shapes (``data.static_shapes: false``): every new
    set of sample lengths would compile the layers again, and after a few torch gives up and runs them uncompiled.
    A data module without that key is left to its own shapes."""
    if getattr(datamodule, "static_shapes", None) is False:
        raise UserError("model.compile needs data.static_shapes: true (else each new set of sample lengths compiles "
                        "the layers again); add --data.static_shapes true")  # fmt: skip


def compile_decoder_layers(model: torch.nn.Module, mode: str, device: torch.device) -> int:
    """Compile each decoder layer of ``model`` (``mode``: ``layers`` or ``cuda_graphs``) and return how many; the
    compilation itself happens at each layer's first call. ``cuda_graphs`` off the GPU compiles without them."""
    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"model.compile: {type(model).__name__} names no decoder layers (_no_split_modules) to "
                        "compile; set it to false")  # fmt: skip
    import torch._dynamo

    if checkpointed_layers(model) and hasattr(torch._dynamo.config, SKIP_SIDE_EFFECTS):
        # A layer's side effects (transformers' hub-kernel layers set a context variable) would stop the compiler
        # at the checkpoint; the recomputation does not need them again.
        setattr(torch._dynamo.config, SKIP_SIDE_EFFECTS, True)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and not embeddings.weight.requires_grad:
        # Frozen embeddings (LoRA): the first layer's input would need no gradient and the others' would, which
        # is two graphs; with a gradient asked for it too, one serves every layer.
        model.enable_input_require_grads()
    options = {"backend": backend(), "dynamic": False}
    if mode == CUDA_GRAPHS and device.type == "cuda" and options["backend"] == "inductor":
        options = {"mode": "reduce-overhead", "dynamic": False}
    for layer in layers:
        layer.compile(**options)
    return len(layers)
