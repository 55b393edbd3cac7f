"""AdamW with decay only where it belongs (torch's, or bitsandbytes' paged 8-bit one), and the learning-rate
schedule."""

import math
from typing import Literal

import torch
from torch import nn

Schedule = Literal["cosine", "linear", "constant"]
OptimizerName = Literal["adamw", "paged_adamw_8bit"]


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: weight decay on matrices, none on norms, biases and embeddings (tied ones included)."""
    no_decay = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            no_decay.update(id(parameter) for parameter in module.parameters(recurse=False))
    decay, plain, seen = [], [], set()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        skip = id(parameter) in no_decay or name.endswith("bias") or parameter.ndim < 2
        (plain if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, learning_rate: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
    """``torch.optim.AdamW`` over :func:`decay_groups`; the fused kernel when every parameter is on a GPU."""
    groups = [group for group in decay_groups(model, weight_decay) if group["params"]]
    on_gpu = all(parameter.is_cuda for group in groups for parameter in group["params"])
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=on_gpu or None)


def build_optimizer(name: OptimizerName, model: nn.Module, learning_rate: float, weight_decay: float):
    """``adamw`` (:func:`build_adamw`) or ``paged_adamw_8bit`` (bitsandbytes: 8-bit states in paged memory that
    spills to the CPU under pressure), both over :func:`decay_groups`."""
    if name == "adamw":
        return build_adamw(model, learning_rate, weight_decay)
    from bitsandbytes.optim import PagedAdamW8bit

    groups = [group for group in decay_groups(model, weight_decay) if group["params"]]
    return PagedAdamW8bit(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)


def warmup_steps_of(total_steps: int, warmup: float) -> int:
    """``warmup`` below 1 is a fraction of ``total_steps``; from 1 up, a number of steps."""
    return int(warmup) if warmup >= 1 else math.ceil(warmup * total_steps)


def build_schedule(optimizer, schedule: Schedule, warmup_steps: int, total_steps: int):
    """Linear warm-up, then ``schedule`` (transformers' own schedulers) down to zero at ``total_steps``."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1))
