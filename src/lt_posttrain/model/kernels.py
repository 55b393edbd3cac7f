"""Liger kernels (Triton, GPU only): fused RMSNorm, RoPE and SwiGLU patched into a loaded model, and the parts the
fused linear cross-entropy loss needs (the decoder's hidden states and the output head), so no logits tensor is built.

Liger's own cross-entropy patches are never applied: the SFT loss calls the fused kernel itself
(:func:`lt_posttrain.training.losses.fused_linear_cross_entropy_sum`), keeping its sum and per-token weights.
Liger patches some functions module-wide (RoPE in ``transformers.models.<arch>``): later models of the same
architecture in the process use them too.
"""

import importlib.util
import inspect
from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch
from torch import nn

from lt_posttrain.errors import UserError

FUSED_LOSS = "fused_linear_cross_entropy"
_CROSS_ENTROPY_PATCHES = ("cross_entropy", "fused_linear_cross_entropy")  # Liger's own loss patches: never used


@dataclass
class LigerKernels:
    """Liger kernels by name; each is off unless set (``liger: true`` turns on all that the architecture supports).

    Args:
        rms_norm: fused RMSNorm.
        rope: fused rotary position embedding.
        swiglu: fused SwiGLU MLP.
        fused_linear_cross_entropy: the SFT loss straight from the hidden states and the head's weight, in chunks,
            without the ``[tokens, vocab]`` logits tensor.
    """

    rms_norm: bool = False
    rope: bool = False
    swiglu: bool = False
    fused_linear_cross_entropy: bool = False


LigerOption = Union[bool, LigerKernels]


def require_liger() -> None:
    """Raise one line unless liger-kernel can run here (a CUDA GPU and the package)."""
    if not torch.cuda.is_available():
        raise UserError("model.liger: Liger kernels are Triton GPU kernels and need a CUDA GPU; none is visible")
    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError("model.liger needs liger-kernel: pip install 'lt-posttrain[liger]'")


def _apply_function(model_type: str):
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    function = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if function is None:
        supported = ", ".join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))
        raise UserError(f"model.liger: Liger has no kernels for architecture {model_type!r} (it has: {supported})")
    return function


def _kernel_switches(function) -> dict[str, bool]:
    """The kernels ``apply_liger_kernel_to_<arch>`` can switch, with Liger's defaults for the architecture."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if isinstance(parameter.default, bool)
    }


def logit_scaling(config) -> Optional[str]:
    """The config key by which the architecture scales its logits (neither the fused nor the tiled loss does), or
    None."""
    for key in ("logits_scaling", "logit_scale"):
        if getattr(config, key, None) not in (None, 1.0):
            return key
    return None


def choose_liger_kernels(config, request: LigerOption) -> list[str]:
    """The kernels to use for a model of ``config``: with ``True`` every one Liger turns on by default for the
    architecture, plus the fused loss where the logits are plain; with :class:`LigerKernels` exactly those set,
    refusing any the architecture lacks."""
    model_type = config.model_type
    switches = _kernel_switches(_apply_function(model_type))
    if request is True:
        chosen = [name for name, default in switches.items() if default and name not in _CROSS_ENTROPY_PATCHES]
        return chosen + ([FUSED_LOSS] if FUSED_LOSS in switches and logit_scaling(config) is None else [])
    if not request:
        return []
    wanted = [name for name, on in asdict(request).items() if on]
    missing = [name for name in wanted if name not in switches]
    if missing:
        has = ", ".join(name for name in switches if name != "cross_entropy")
        raise UserError(f"model.liger.{missing[0]}: Liger has no such kernel for {model_type!r} (it has: {has})")
    if FUSED_LOSS in wanted and logit_scaling(config):
        raise UserError(f"model.liger.{FUSED_LOSS}: {model_type} scales its logits ({logit_scaling(config)}), "
                        "which the fused loss does not; set it to false")  # fmt: skip
    return wanted


def apply_liger_kernels(model, request: LigerOption) -> list[str]:
    """Patch the chosen Liger kernels into ``model`` (a transformers causal LM, before any adapters) and return
    their names; the fused loss is the caller's to use (see :func:`fused_loss_parts`)."""
    require_liger()
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    chosen = choose_liger_kernels(model.config, request)
    switches = _kernel_switches(_apply_function(model.config.model_type))
    flags = {name: name in chosen and name not in _CROSS_ENTROPY_PATCHES for name in switches}
    _apply_liger_kernel_to_instance(model, **flags)
    return chosen


def output_head(model) -> tuple[nn.Module, Optional[float]]:
    """``(head, softcap)`` of a causal LM (PEFT-wrapped or not): the module that turns the final hidden states into
    logits, and the model's final logit softcapping (``softcap * tanh(logits / softcap)``), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if type(head).__name__ == "ModulesToSaveWrapper":  # lora.modules_to_save: the trained copy is the live one
        head = head.modules_to_save[head.active_adapters[0]]
    return head, getattr(base.config, "final_logit_softcapping", None)


def decoder_of(model) -> nn.Module:
    """The decoder of a causal LM, PEFT-wrapped or not: ``decoder(input_ids=..., **kwargs).last_hidden_state`` is the
    output head's input, and no logits are computed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def fused_loss_parts(model) -> tuple[nn.Module, nn.Linear, Optional[float]]:
    """``(decoder, head, softcap)`` of a causal LM, PEFT-wrapped or not: ``decoder(input_ids=..., **kwargs)`` gives
    the final hidden states, ``head`` the linear layer that turns them into logits (softcapped if not None)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, softcap = output_head(base)
    if type(head) is not nn.Linear:
        raise UserError(
            f"model.liger.{FUSED_LOSS}: the output head is a {type(head).__name__}, not a plain linear layer "
            "(an adapter on lm_head?); set it to false or leave lm_head out of lora.target_modules"
        )
    return decoder_of(base), head, softcap
