"""The optimizer: which one a recipe asks for, decided once (:class:`OptimizerOptions`: checked as the trainer is built,
``auto`` resolved once the weights exist), and how it is built (AdamW with decay only where it belongs: torch's fused
one, a compensated or stochastically rounding one for bf16 weights, bitsandbytes' 8-bit ones, or the user's own
class), and the learning-rate schedule."""

import importlib
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union, get_args

import optimi
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lt_posttrain.errors import UserError
from lt_posttrain.model.quantization import require_bitsandbytes
from lt_posttrain.training.optimizer_in_backward import AdamWInBackward, stochastic_adamw_in_backward
from lt_posttrain.training.precision import low_precision_trainables, rounding_step
from lt_posttrain.training.sharding import full_shape
from lt_posttrain.training.strategy import distribution

Schedule = Literal["cosine", "linear", "constant"]
BuiltInOptimizer = Literal["auto", "adamw", "adamw_kahan", "adamw_stochastic", "adamw_8bit", "paged_adamw_8bit"]
OptimizerName = Union[BuiltInOptimizer, str]  # a str: the import path of an Optimizer class

UNCOMPENSATED = frozenset({"adamw", "adamw_8bit", "paged_adamw_8bit"})
"""The built-in optimizers whose updates of bf16 weights round away when smaller than half a rounding step."""

IN_BACKWARD = {"auto": "adamw_kahan", "adamw_kahan": "adamw_kahan", "adamw_stochastic": "adamw_stochastic"}
"""``model.optimizer`` -> the optimizer that steps in the backward pass (``model.optimizer_in_backward``)."""


@dataclass(frozen=True)
class OptimizerOptions:
    """The optimizer a recipe asks for, checked when it is made (a missing package, a wrong import path or a
    combination that cannot run is one line before anything loads); the one place that knows the optimizers' names.

    Args:
        name: ``model.optimizer`` (``auto``, a built-in name, or the import path of an optimizer class).
        in_backward: ``model.optimizer_in_backward``: each weight steps in the backward pass.
    """

    name: OptimizerName = "auto"
    in_backward: bool = False

    def __post_init__(self):
        if self.name in ("adamw_8bit", "paged_adamw_8bit"):
            require_bitsandbytes(f"model.optimizer {self.name}")
        elif self.name == "adamw_stochastic":
            require_torchao("model.optimizer adamw_stochastic")
        elif self.name not in get_args(BuiltInOptimizer):
            optimizer_class_of(self.name)  # a wrong import path fails now
        if self.in_backward and self.name not in IN_BACKWARD:
            raise UserError(f"model.optimizer_in_backward needs model.optimizer adamw_kahan (or auto) or "
                            f"adamw_stochastic, not {self.name}")  # fmt: skip

    def resolved(self, model: nn.Module, strategy: Any = None) -> str:
        """The optimizer to build for ``model`` under ``strategy``: ``auto`` resolved (:func:`resolve_optimizer`)."""
        return IN_BACKWARD[self.name] if self.in_backward else resolve_optimizer(self.name, model, strategy)

    def build(self, model: nn.Module, learning_rate: float, weight_decay: float, strategy: Any = None):
        """The optimizer over ``model``'s trained weights; warns (once, on rank 0) when it loses updates of bf16
        weights (:func:`lost_update_warning`)."""
        name = self.resolved(model, strategy)
        warning = lost_update_warning(name, model, learning_rate, strategy)
        if warning:
            rank_zero_warn(warning)
        return build_optimizer(name, model, learning_rate, weight_decay, self.in_backward)


def resolve_optimizer(name: str, model: nn.Module, strategy: Any = None) -> str:
    """``auto``: ``adamw_kahan`` when the trained weights are bf16/fp16 (``bf16-true``) and the strategy keeps no fp32
    master weights of its own, else ``adamw``; any other name as it is."""
    if name != "auto":
        return name
    if low_precision_trainables(model) and not distribution(strategy).keeps_master_weights:
        return "adamw_kahan"
    return "adamw"


def lost_update_warning(name: str, model: nn.Module, learning_rate: float, strategy: Any = None) -> Optional[str]:
    """One line when optimizer ``name`` updates bf16/fp16 weights without compensation (``None`` otherwise): the
    learning rate beside the rounding step of a typical weight."""
    low = low_precision_trainables(model)
    if name not in UNCOMPENSATED or not low or distribution(strategy).keeps_master_weights:
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
        shape = full_shape(model, name, parameter)  # ZeRO-3 and FSDP shards are 1-D
        skip = id(parameter) in no_decay or name.endswith("bias") or len(shape) < 2
        (plain if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, learning_rate: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
    """``torch.optim.AdamW`` over :func:`decay_groups`; the fused kernel when every parameter is on a GPU."""
    groups = [group for group in decay_groups(model, weight_decay) if group["params"]]
    on_gpu = all(parameter.is_cuda for group in groups for parameter in group["params"])
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=on_gpu or None)


def build_optimizer(name: str, model: nn.Module, learning_rate: float, weight_decay: float, in_backward: bool = False):
    """The optimizer ``name`` over :func:`decay_groups` (resolve ``auto`` first: :func:`resolve_optimizer`).

    ``adamw``: torch's (fused on GPU). ``adamw_kahan``: torch-optimi's AdamW with Kahan-compensated updates, so bf16
    weights lose no update smaller than their rounding step (one more bf16 buffer a weight). ``adamw_stochastic``:
    torchao's AdamW rounding bf16 weights stochastically, unbiased on average at no extra memory. ``adamw_8bit`` /
    ``paged_adamw_8bit``: bitsandbytes' 8-bit states (paged: spills to the CPU under memory pressure). Else the import path of an optimizer class,
    called as ``cls(param_groups, lr=learning_rate)``. ``in_backward`` (``adamw_kahan`` or ``adamw_stochastic``): each
    weight steps in the backward pass (``training/optimizer_in_backward.py``).
    """
    groups = [group for group in decay_groups(model, weight_decay) if group["params"]]
    if name == "adamw":
        return build_adamw(model, learning_rate, weight_decay)
    if name == "adamw_kahan" and in_backward:
        return AdamWInBackward(groups, learning_rate)
    if name == "adamw_stochastic" and in_backward:
        return stochastic_adamw_in_backward(torchao_adamw(), groups, learning_rate)
    if name == "adamw_kahan":
        return optimi.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, kahan_sum=True)
    if name == "adamw_stochastic":
        return stochastic_rounding_adamw(groups, learning_rate)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        from bitsandbytes.optim import AdamW8bit, PagedAdamW8bit

        optimizer_class = PagedAdamW8bit if name == "paged_adamw_8bit" else AdamW8bit
        return optimizer_class(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)
    return optimizer_class_of(name)(groups, lr=learning_rate)


def require_torchao(what: str):
    """``torchao.optim``, or one line saying how to install it."""
    try:
        from torchao import optim as torchao_optim
    except ImportError as error:
        raise UserError(f"{what} needs torchao ({error}): pip install 'lt-posttrain[stochastic]'") from error
    return torchao_optim


def stochastic_rounding_adamw(groups: list[dict], learning_rate: float) -> torch.optim.Optimizer:
    """torchao's AdamW with ``bf16_stochastic_round``."""
    return torchao_adamw()(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, bf16_stochastic_round=True)


def torchao_adamw() -> type:
    """torchao's AdamW class: public ``AdamW`` up to torchao 0.13, ``_AdamW`` after."""
    torchao_optim = require_torchao("model.optimizer adamw_stochastic")
    return getattr(torchao_optim, "_AdamW", None) or torchao_optim.AdamW


def optimizer_class_of(path: str) -> type:
    """The optimizer class at ``path`` (``package.module.Class``), or one clear line."""
    module_name, _, class_name = path.replace(":", ".").rpartition(".")
    known = ", ".join(get_args(BuiltInOptimizer))
    if not module_name:
        raise UserError(f"model.optimizer {path!r}: not a known optimizer ({known}) nor an import path package.Class")
    try:
        optimizer_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise UserError(f"model.optimizer {path!r}: cannot import it ({error})") from error
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise UserError(f"model.optimizer {path!r}: not a torch.optim.Optimizer subclass")
    return optimizer_class


def warmup_steps_of(total_steps: int, warmup: float) -> int:
    """``warmup`` below 1 is a fraction of ``total_steps``; from 1 up, a number of steps."""
    return int(warmup) if warmup >= 1 else math.ceil(warmup * total_steps)


def build_schedule(optimizer, schedule: Schedule, warmup_steps: int, total_steps: int):
    """Linear warm-up, then ``schedule`` (transformers' own schedulers) down to zero at ``total_steps``."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1))


RECIPE_GROUP_KEYS = ("initial_lr", "weight_decay")
"""What a resume takes from the recipe rather than from the checkpoint, in each optimizer parameter group: the peak
learning rate (``initial_lr``, which the schedule scales) and the weight decay."""


def recipe_values(trainer) -> dict:
    """The optimizers' settings as the recipe built them, before a checkpoint's states replace them (call it in
    ``on_fit_start``): :data:`RECIPE_GROUP_KEYS` of each parameter group of each optimizer, and each schedule's base
    learning rates."""
    groups = [
        [{key: _plain(group[key]) for key in RECIPE_GROUP_KEYS if key in group} for group in optimizer.param_groups]
        for optimizer in trainer.optimizers
    ]
    base_lrs = [list(getattr(config.scheduler, "base_lrs", [])) for config in trainer.lr_scheduler_configs]
    return {"groups": groups, "base_lrs": base_lrs}


def apply_recipe_values(trainer, values: dict) -> None:
    """Put the recipe's settings (:func:`recipe_values`) back into the optimizers and schedules restored from a
    checkpoint, and set each parameter group's learning rate to the recipe's schedule at the restored step.

    Raises:
        UserError: a learning rate that changed, under a schedule that is not a ``LambdaLR`` (whose rate at a step is
            the base rate times a function of the step, which this recomputes).
    """
    from torch.optim.lr_scheduler import LambdaLR

    for optimizer, groups in zip(trainer.optimizers, values["groups"]):
        for group, wanted in zip(optimizer.param_groups, groups):
            group.update(wanted)
    for config, base_lrs in zip(trainer.lr_scheduler_configs, values["base_lrs"]):
        schedule = config.scheduler
        if not isinstance(schedule, LambdaLR):
            if list(getattr(schedule, "base_lrs", [])) != base_lrs:
                raise UserError(
                    f"model.learning_rate: the resumed schedule ({type(schedule).__name__}) cannot take a new learning "
                    "rate; resume with the checkpoint's learning rate"
                )
            continue
        schedule.base_lrs = list(base_lrs)
        rates = [base * rate(schedule.last_epoch) for base, rate in zip(base_lrs, schedule.lr_lambdas)]
        for group, rate in zip(schedule.optimizer.param_groups, rates):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate
        schedule._last_lr = rates


def _plain(value):
    return float(value) if isinstance(value, torch.Tensor) else value
