"""bf16 weights and what rounds them: the rounding step of a weight, which an update smaller than half of loses (the
optimizer's choice, ``training/optimizer.py``, avoids it), and clipping under bf16 autocast.

A bf16 weight of magnitude 0.02 has a rounding step of about 1.2e-4: plain AdamW's update at a learning rate of 1e-5
rounds away. Kahan-compensated AdamW carries the lost part to the next step, stochastic rounding rounds up with the
probability of the lost fraction (unbiased, no extra memory, noisier); fp32 master weights (``bf16-mixed``,
or DeepSpeed's ZeRO optimizer) avoid the problem at about twice the memory for weights and states.
"""

import math

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

LOW_PRECISION = (torch.bfloat16, torch.float16)


def low_precision_trainables(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trained weights of ``model`` held in bf16 or fp16."""
    return [p for p in model.parameters() if p.requires_grad and p.dtype in LOW_PRECISION]


def rounding_step(magnitude: float, dtype: torch.dtype = torch.bfloat16) -> float:
    """The distance between ``magnitude`` and the next representable value of ``dtype``."""
    if magnitude <= 0:
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


def clip_under_bf16_autocast(plugin, optimizer, clip_val, algorithm) -> bool:
    """Clip the gradients under ``bf16-mixed`` whatever the optimizer; False (nothing done) for any other precision.

    bf16 autocast scales no loss, so the gradients are true ones, yet Lightning's ``MixedPrecision`` refuses to clip
    for a fused optimizer (which could unscale inside its step): clip as Lightning does without mixed precision.
    """
    if not clip_val or not isinstance(plugin, MixedPrecision) or plugin.scaler is not None:
        return False
    Precision.clip_gradients(plugin, optimizer, clip_val, GradClipAlgorithmType(algorithm or "norm"))
    return True
