"""The distributed strategy of a recipe (``trainer.strategy``): what DeepSpeed and FSDP need, checked in one line
before anything loads, and the DeepSpeed settings this framework's training loop relies on.

Lightning's names work unchanged (``ddp``, ``deepspeed_stage_1``, ``deepspeed_stage_2``,
``deepspeed_stage_2_offload``, ``deepspeed_stage_3``, ``deepspeed_stage_3_offload``, ``fsdp``,
``fsdp_cpu_offload``), and so does a class with its arguments, e.g. a DeepSpeed config file:
``{class_path: lightning.pytorch.strategies.DeepSpeedStrategy, init_args: {config: ds.json}}``.
"""

import contextlib
import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from lt_posttrain.errors import UserError

SINGLE, DDP, DEEPSPEED, FSDP, OTHER = "single", "ddp", "deepspeed", "fsdp", "other"


@dataclass(frozen=True)
class Distribution:
    """How a strategy spreads training over devices: the one answer every other module asks for
    (:func:`distribution`), instead of looking at the strategy itself.

    Attributes:
        family: ``single`` (one device, or no trainer), ``ddp`` (whole replicas, gradients averaged), ``deepspeed``,
            ``fsdp``, or ``other`` (any other strategy, or a name Lightning resolves only later, such as ``auto``).
        zero_stage: DeepSpeed's ZeRO stage (0 where not DeepSpeed, or not known from a recipe's strategy name).
    """

    family: str
    zero_stage: int = 0

    @property
    def zero3(self) -> bool:
        """DeepSpeed's ZeRO stage 3: the weights are partitioned over the ranks as they are created."""
        return self.family == DEEPSPEED and self.zero_stage == 3

    @property
    def shards_weights(self) -> bool:
        """Each rank holds only a part of each weight (ZeRO-3, FSDP): the model is created, fitted and gathered
        accordingly (``training/sharding.py``)."""
        return self.family == FSDP or self.zero3

    @property
    def keeps_master_weights(self) -> bool:
        """The strategy's own optimizer wrapper keeps fp32 master weights and frees the gradients itself (DeepSpeed's
        ZeRO optimizer): no second compensation for bf16 weights, and no gradient freeing of ours."""
        return self.family == DEEPSPEED


def _get(section: Any, key: str, default=None):
    """``section[key]`` of a parsed config section (a dict or a jsonargparse ``Namespace``)."""
    if section is None:
        return default
    if isinstance(section, dict):
        return section.get(key, default)
    return getattr(section, key, default)


def _strategy_class(strategy: Any) -> Optional[type]:
    if isinstance(strategy, type):
        return strategy
    class_path = _get(strategy, "class_path") if not isinstance(strategy, str) else None
    if isinstance(class_path, str):
        module, _, name = class_path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return None  # the parser has already refused a class path that does not import
    return type(strategy)


def _family_of_name(name: str) -> Distribution:
    name = name.lower()
    if name.startswith(DEEPSPEED):
        stage = re.search(r"stage_(\d)", name)
        return Distribution(DEEPSPEED, int(stage.group(1)) if stage else 0)
    if name.startswith(FSDP):
        return Distribution(FSDP)
    if name.startswith(DDP):
        return Distribution(DDP)
    return Distribution(SINGLE if name == "single_device" else OTHER)


def _zero_stage(strategy: Any) -> int:
    """The ZeRO stage of a DeepSpeed strategy object (its config), or of a recipe's ``class_path`` mapping (its
    ``stage`` argument, 0 when not given)."""
    config = getattr(strategy, "config", None)
    if isinstance(config, dict):
        return int((config.get("zero_optimization") or {}).get("stage", 0))
    return int(_get(_get(strategy, "init_args"), "stage", 0) or 0)


def distribution(strategy: Any) -> Distribution:
    """What ``strategy`` does with the model (:class:`Distribution`): a strategy object, a strategy class, a
    ``trainer.strategy`` value of a recipe (a registered name such as ``deepspeed_stage_3``, or a ``class_path``
    mapping), or None (no trainer: one device)."""
    if strategy is None:
        return Distribution(SINGLE)
    if isinstance(strategy, str):
        return _family_of_name(strategy)
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

    cls = _strategy_class(strategy)
    if not isinstance(cls, type):
        return Distribution(OTHER)
    if issubclass(cls, DeepSpeedStrategy):  # before DDP: Lightning's DeepSpeed strategy is a DDP subclass
        return Distribution(DEEPSPEED, _zero_stage(strategy) if not isinstance(strategy, type) else 0)
    if issubclass(cls, FSDPStrategy):
        return Distribution(FSDP)
    if issubclass(cls, DDPStrategy):
        return Distribution(DDP)
    if issubclass(cls, SingleDeviceStrategy):
        return Distribution(SINGLE)
    return Distribution(OTHER)


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, str):
        return strategy
    cls = _strategy_class(strategy)
    return cls.__name__ if isinstance(cls, type) else str(strategy)


def check_strategy(trainer: Any) -> None:
    """Refuse, in one line, a ``trainer`` config section whose strategy cannot run here, before any model or data
    loads (Lightning would fail later, with a traceback).

    Args:
        trainer: the ``trainer`` section as parsed (``strategy``, ``accelerator``, ``accumulate_grad_batches``,
            ``gradient_clip_algorithm``).

    Raises:
        UserError: DeepSpeed is asked for and not installed; DeepSpeed or FSDP without a CUDA GPU; DeepSpeed with
            clipping by value; a DeepSpeed config that cannot work.
    """
    strategy = _get(trainer, "strategy")
    family = distribution(strategy).family
    if family not in (DEEPSPEED, FSDP):
        return
    name = f"trainer.strategy {_strategy_name(strategy)}"
    if family == DEEPSPEED:
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(f"{name} needs DeepSpeed, which is not installed: pip install 'lt-posttrain[deepspeed]'")
        _check_deepspeed_options(name, strategy, trainer)
    _check_accelerator(name, _get(trainer, "accelerator", "auto"))


def _check_deepspeed_options(name: str, strategy: Any, trainer: Any) -> None:
    config = _get(_get(strategy, "init_args"), "config")
    if config is not None:
        check_deepspeed_config(config)
    if _get(trainer, "gradient_clip_algorithm") == "value":
        raise UserError(f"{name}: DeepSpeed clips gradients by norm only; set trainer.gradient_clip_algorithm norm")


def _check_accelerator(name: str, accelerator: Any) -> None:
    if not isinstance(accelerator, str):
        accelerator = "cpu" if "CPUAccelerator" in str(_get(accelerator, "class_path", type(accelerator))) else "gpu"
    if accelerator == "cpu":
        raise UserError(f"{name} runs on CUDA GPUs only, not with trainer.accelerator cpu; on CPU use ddp")
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{name} runs on CUDA GPUs only and none is visible here; on CPU use ddp")


def check_deepspeed_config(config: Any) -> dict:
    """The DeepSpeed config (a path to a JSON file, or a mapping) as a dict, refused in one line if it cannot work
    with Lightning: a missing or malformed file, ``gradient_accumulation_steps`` (``trainer.accumulate_grad_batches``
    sets it), Hugging Face Trainer's ``"auto"`` placeholders, which DeepSpeed itself does not read, or a
    ``zero_optimization`` section DeepSpeed would refuse (a misspelt key, a wrong value)."""
    where = "the DeepSpeed config"
    if isinstance(config, (str, os.PathLike)):
        where = f"DeepSpeed config {os.fspath(config)!r}"
        try:
            with open(config) as file:
                config = json.load(file)
        except FileNotFoundError:
            raise UserError(f"trainer.strategy: {where}: no such file") from None
        except (OSError, ValueError) as error:
            raise UserError(f"trainer.strategy: {where}: not a readable JSON file ({error})") from None
    if not isinstance(config, dict):
        raise UserError(f"trainer.strategy: {where} must be a JSON object of DeepSpeed settings")
    if "gradient_accumulation_steps" in config:
        raise UserError(
            f"trainer.strategy: {where}: remove gradient_accumulation_steps; trainer.accumulate_grad_batches sets it"
        )
    placeholders = _auto_keys(config)
    if placeholders:
        raise UserError(
            f'trainer.strategy: {where}: "auto" is a Hugging Face Trainer placeholder that DeepSpeed cannot read '
            f"({', '.join(placeholders)}); give values or remove these keys"
        )
    _check_zero_section(config.get("zero_optimization") or {}, where)
    return config


def _check_zero_section(section: dict, where: str) -> None:
    """DeepSpeed's own validation of the ``zero_optimization`` section (misspelt keys, wrong values), if installed."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        return
    try:
        DeepSpeedZeroConfig(**section)
    except ValueError as error:  # pydantic's ValidationError
        first = error.errors()[0] if hasattr(error, "errors") else {"loc": (), "msg": str(error)}
        key = ".".join(["zero_optimization", *map(str, first["loc"])])
        raise UserError(f"trainer.strategy: {where}: {key}: {first['msg']}") from None


def _auto_keys(config: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if isinstance(value, dict):
            keys += _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            keys.append(f"{prefix}{key}")
    return keys


def complete_deepspeed_config(config: dict, micro_batch_size: int) -> dict:
    """``config`` with what this framework needs of DeepSpeed, where it does not say otherwise:

    - ``train_micro_batch_size_per_gpu``: the data's micro-batch size. DeepSpeed uses it for its throughput log;
      left out, Lightning reads it from the data loader's batch sampler, which planned micro-batches do not have.
    - ``zero_allow_untested_optimizer: true`` (as Lightning's presets have it): the optimizer comes from
      ``configure_optimizers``, and DeepSpeed otherwise refuses one it has not tested with ZeRO;
    - ``zero_force_ds_cpu_optimizer: false`` when the optimizer state is offloaded: ZeRO-Offload otherwise refuses
      any optimizer but DeepSpeed's compiled CPU Adam.

    A config with its own ``optimizer`` section (DeepSpeed then builds the optimizer) gets neither.

    Args:
        config: the strategy's DeepSpeed config (not changed).
        micro_batch_size: samples (or packed rows) per micro-batch and GPU.
    """
    config = dict(config)
    config.setdefault("train_micro_batch_size_per_gpu", micro_batch_size)
    if "optimizer" in config:
        return config
    config.setdefault("zero_allow_untested_optimizer", True)
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if offload.get("device", "none") != "none":
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


@functools.cache
def _accumulating_in_lightning(cls: type) -> type:
    """``cls``, a DeepSpeed strategy class, with gradient accumulation run by Lightning's loop as for DDP.

    Lightning's DeepSpeed strategy leaves accumulation to DeepSpeed (``handles_gradient_accumulation``): Lightning then
    runs the optimizer-step hooks (``on_before_optimizer_step``: logging, gradient checks) on every micro-batch,
    DeepSpeed divides the loss by the accumulation again after Lightning has, and DeepSpeed counts its steps across
    epochs where Lightning (the global step, the learning-rate schedule) and the data plan end each epoch with a
    shorter step. Here Lightning's loop calls the hooks and DeepSpeed's ``step`` once per optimizer step, tells the
    engine before each micro-batch whether it ends the step, and the loss is divided by the accumulation once.
    """

    class Strategy(cls):
        @property
        def handles_gradient_accumulation(self) -> bool:
            return False

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            ends_step = not self.lightning_module.trainer.fit_loop._should_accumulate()
            self.deepspeed_engine.set_gradient_accumulation_boundary(ends_step)
            return super().training_step(*args, **kwargs)

        def backward(self, closure_loss: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            return super().backward(closure_loss, optimizer, *args, scale_wrt_gas=False, **kwargs)

        @contextlib.contextmanager
        def block_backward_sync(self) -> Iterator[None]:
            yield  # not the engine's no_sync, which ZeRO-2 and 3 refuse: training_step told the engine

    Strategy.__name__ = Strategy.__qualname__ = cls.__name__
    return Strategy


def prepare_strategy(strategy: Any, micro_batch_size: int) -> None:
    """Prepare a DeepSpeed strategy before training starts: its config completed (:func:`complete_deepspeed_config`),
    and gradient accumulation run by Lightning's loop (:func:`_accumulating_in_lightning`). Other strategies are left
    as they are."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        strategy.config = complete_deepspeed_config(strategy.config, micro_batch_size)
        if strategy.handles_gradient_accumulation:  # a class property: the object gets the class that changes it
            strategy.__class__ = _accumulating_in_lightning(type(strategy))


def gather_objects(value: Any) -> list:
    """Every rank's ``value`` (any picklable object), by rank, on every rank: ``[value]`` without a process group.
    A collective: every rank calls it."""
    import torch.distributed

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def leave_process_group() -> None:
    """Destroy the default process group once a run is over. Lightning does so itself only for NCCL; a gloo group
    left alive can abort the process as the interpreter exits (its worker threads outlive Python), so a finished
    multi-process run on CPU would exit with SIGABRT."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
