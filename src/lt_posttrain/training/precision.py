"""bf16 weights and the optimizer: pick one that loses no update, and say so when the recipe picks one that does.

A bf16 weight of magnitude 0.02 has a rounding step of about 1.2e-4: plain AdamW's update at a learning rate of 1e-5
rounds away. Kahan-compensated AdamW carries the lost part to the next step, stochastic rounding rounds up with the
probability of the lost fraction (unbiased, no extra memory, noisier); fp32 master weights (``bf16-mixed``,
or DeepSpeed's ZeRO optimizer) avoid the problem at about twice the memory for weights and states.
"""

import math
from typing import Optional

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

LOW_PRECISION = (torch.bfloat16, torch.float16)
COMPENSATED = frozenset({"adamw_kahan", "adamw_stochastic"})
UNCOMPENSATED = frozenset({"adamw", "adamw_8bit", "paged_adamw_8bit"})


def low_precision_trainables(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad and p.dtype in LOW_PRECISION]


def keeps_master_weights(strategy) -> bool:
    """DeepSpeed's ZeRO optimizer keeps fp32 master weights of its own: a second compensation is not wanted."""
    return type(strategy).__name__.startswith("DeepSpeed")


def resolve_optimizer(name: str, model: torch.nn.Module, strategy=None) -> str:
    """``auto``: ``adamw_kahan`` when the trained weights are bf16/fp16 (``bf16-true``), else ``adamw``."""
    if name != "auto":
        return name
    if low_precision_trainables(model) and not keeps_master_weights(strategy):
        return "adamw_kahan"
    return "adamw"


def rounding_step(magnitude: float, dtype: torch.dtype = torch.bfloat16) -> float:
    """The distance between ``magnitude`` and the next representable value of ``dtype``."""
    if magnitude <= 0:
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


def lost_update_warning(name: str, model: torch.nn.Module, learning_rate: float, strategy=None) -> Optional[str]:
    """One line when optimizer ``name`` updates bf16/fp16 weights without compensation (``None`` otherwise): the
    learning rate beside the rounding step of a typical weight."""
    low = low_precision_trainables(model)
    if name not in UNCOMPENSATED or not low or keeps_master_weights(strategy):
        return None
    matrices = [p for p in low if p.ndim >= 2] or low
    sample = torch.cat([p.detach().flatten()[:: max(1, p.numel() // 4096)].float().abs() for p in matrices])
    median = float(sample.median())
    step = rounding_step(median, low[0].dtype)
    return (
        f"{low[0].dtype} weights with plain {name} (model.optimizer {name}): at learning rate {learning_rate:g}, an "
        f"update smaller than half the rounding step of the weight ({step:.1e} at the median magnitude {median:.2g}) "
        "is lost, so many weights may stop training; use model.optimizer adamw_kahan (the default, auto), "
        "adamw_stochastic (torchao) or "
        "trainer.precision bf16-mixed with model.dtype float32"
    )


def clip_under_bf16_autocast(plugin, optimizer, clip_val, algorithm) -> bool:
    """Clip the gradients under ``bf16-mixed`` whatever the optimizer; False (nothing done) for any other precision.

    bf16 autocast scales no loss, so the gradients are true ones, yet Lightning's ``MixedPrecision`` refuses to clip
    for a fused optimizer (which could unscale inside its step): clip as Lightning does without mixed precision.
    """
    if not clip_val or not isinstance(plugin, MixedPrecision) or plugin.scaler is not None:
        return False
    Precision.clip_gradients(plugin, optimizer, clip_val, GradClipAlgorithmType(algorithm or "norm"))
    return True
