"""A model whose weights are split across ranks (DeepSpeed ZeRO-3, FSDP): created straight into its shards, fitted
to the strategy once built, gathered back whole for the Hugging Face export; and frozen models (a reference, a
teacher) placed as the trained model is."""

import argparse
import re
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import torch

from lt_posttrain.errors import UserError
from lt_posttrain.model.export import submodule_state_dict
from lt_posttrain.model.layers import decoder_layers
from lt_posttrain.training.strategy import FSDP, distribution
from lt_posttrain.training.tiled import run_as_forward


def zero3_config(strategy: Any) -> Optional[dict]:
    """The DeepSpeed config of ``strategy`` if it partitions the weights (ZeRO stage 3), else None."""
    return strategy.config if distribution(strategy).zero3 else None


@contextmanager
def sharded_creation(strategy: Any) -> Iterator[None]:
    """Around model creation (loading, LoRA): under ZeRO-3, ``from_pretrained`` loads each weight straight into its
    partition (no rank holds the whole model) and PEFT gathers partitioned weights where it reads them. Both look for
    a live ``HfDeepSpeedConfig``, which Lightning does not create and transformers only weakly references: this holds
    one. It is dropped on exit, since while it lives every ``from_pretrained`` partitions (the CPU reload of
    ``checkpoint.merge_lora`` too). Under other strategies it does nothing.

    Args:
        strategy: the trainer's strategy (None outside a trainer).
    """
    config = zero3_config(strategy)
    if config is None:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del alive


def fit_to_strategy(model: torch.nn.Module, strategy: Any, fused_loss: bool = False) -> None:
    """What a sharding strategy needs of a built model (LoRA applied):

    - ZeRO-3: LoRA's B matrices zeroed in their partitions (:func:`zero_lora_b`);
    - FSDP: each decoder layer its own FSDP unit (:func:`wrap_decoder_layers`), unless ``auto_wrap_policy`` is given,
      and every parameter's full shape recorded (:data:`FULL_SHAPES`): FSDP turns them into 1-D shards.

    Args:
        model: the Hugging Face (or PEFT) model.
        strategy: the trainer's strategy (None outside a trainer).
        fused_loss: Liger's fused linear cross-entropy is on.

    Raises:
        UserError: the fused loss under ZeRO-3 or FSDP: it reads the output head's weight outside the head's own
            forward, where both keep it sharded. DoRA under ZeRO-3, for the same reason: it reads its A and B
            outside their layers' forward (FSDP gathers a whole decoder layer, so DoRA works there).
    """
    placement = distribution(strategy)
    if fused_loss and placement.shards_weights:
        raise UserError(
            "model.liger: fused_linear_cross_entropy reads the output head's weight, which DeepSpeed ZeRO-3 and FSDP "
            "keep sharded; set model.liger.fused_linear_cross_entropy false or use ZeRO-2 or DDP"
        )
    dora = any(getattr(config, "use_dora", False) for config in getattr(model, "peft_config", {}).values())
    if dora and placement.zero3:
        raise UserError(
            "model.lora.use_dora: DoRA reads its adapter weights outside their layers, where DeepSpeed ZeRO-3 keeps "
            "them partitioned; set model.lora.use_dora false, or use ZeRO-2, FSDP or DDP"
        )
    if placement.zero3:
        zero_lora_b(model)
    elif placement.family == FSDP:
        shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}  # tied ones too
        setattr(model, FULL_SHAPES, shapes)
        if "auto_wrap_policy" not in strategy.kwargs:
            wrap_decoder_layers(strategy, model)


WRAPPER_PREFIXES = re.compile(r"_fsdp_wrapped_module\.|_checkpoint_wrapped_module\.")  # FSDP's and checkpointing's
FULL_SHAPES = "_lt_posttrain_full_shapes"  # model attribute: parameter name -> shape, before FSDP flattens them


def full_shape(model: torch.nn.Module, name: str, parameter: torch.Tensor) -> torch.Size:
    """``parameter``'s shape in the unsharded model: ZeRO-3 keeps it as ``ds_shape``, FSDP in :data:`FULL_SHAPES`."""
    if hasattr(parameter, "ds_shape"):
        return parameter.ds_shape
    recorded = getattr(model, FULL_SHAPES, {})
    return recorded.get(WRAPPER_PREFIXES.sub("", name), parameter.shape)


def zero_lora_b(model: torch.nn.Module) -> int:
    """Zero LoRA's B matrices (and biases) of a ZeRO-3 partitioned model, so the adapters start as the identity.

    PEFT initialises B to zero, but under ``deepspeed.zero.Init`` a new layer's weight is already partitioned into
    an empty tensor by then, and zeroing that changes nothing: the adapters would start random and change the model.
    Returns the number of tensors zeroed.
    """
    import deepspeed

    weights = [p for name, p in model.named_parameters() if ".lora_B." in name and hasattr(p, "ds_id")]
    if weights:
        with deepspeed.zero.GatheredParameters(weights, modifier_rank=0), torch.no_grad():
            for weight in weights:
                weight.zero_()
    return len(weights)


def wrap_decoder_layers(strategy: Any, model: torch.nn.Module) -> None:
    """Set ``strategy``'s FSDP wrap policy to the model's decoder-layer classes (its ``_no_split_modules``), so
    that FSDP gathers one layer at a time; without a policy, FSDP makes the whole model one unit and gathers every
    weight at once on each GPU."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layers = {type(module) for module in decoder_layers(model)}
    if layers:
        strategy.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(layers)


def gather_state_dict(strategy: Any, trainable_only: bool = False) -> Optional[dict]:
    """The Hugging Face model's weights (the ``model`` attribute of the LightningModule) gathered whole from their
    shards, keyed as the model's own ``state_dict``: on rank 0 the weights (ZeRO-3: in 16 bits, one layer gathered at
    a time; FSDP: gathered on the CPU), elsewhere an empty dict. None when ``strategy`` does not shard the weights (the
    model's own state is whole then). Every rank must call it.

    Args:
        strategy: the trainer's strategy, set up (its ``model`` is the DeepSpeed engine or the FSDP module).
        trainable_only: under ZeRO-3, keep only the trainable weights (all a LoRA adapter export needs).
    """
    placement = distribution(strategy)
    if placement.zero3:
        engine = strategy.deepspeed_engine
        state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)
    elif placement.family == FSDP:  # what Lightning's full checkpoints do, whatever the strategy's state_dict_type
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        # Offloading from the CPU to the CPU frees the storage that FSDP then clones from (a crash).
        whole = FullStateDictConfig(offload_to_cpu=strategy.root_device.type != "cpu", rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, whole):
            state = strategy.model.state_dict()
    else:
        return None
    return submodule_state_dict(state or {}, "model")


class FrozenModel:
    """A model that is run and never trained (a reference, a teacher), placed as the trained model is:

    - one device, DDP: the model as it is; the LightningModule that holds it moves and casts it with itself;
    - DeepSpeed ZeRO-3: created into its partitions (as the trained model is) and run by a DeepSpeed inference engine,
      made on the first call (after the strategy has set up the trained model's engine), which gathers one layer's
      weights at a time;
    - FSDP: wrapped as Lightning wraps the trained model (:func:`fsdp_wrapped`).

    Call it as the model, ``frozen(**inputs)``: it runs without gradients; or run code that calls its parts one by
    one with :meth:`run`.

    Args:
        model: the model, in eval mode with ``requires_grad`` off, created in the strategy's creation context.
        strategy: the trainer's strategy (None outside a trainer).
    """

    def __init__(self, model: torch.nn.Module, strategy: Any):
        placement = distribution(strategy)
        # what runs: the model, its FSDP wrapper, or (ZeRO-3, once called) its inference engine
        self.module = fsdp_wrapped(model, strategy) if placement.family == FSDP else model
        self.sharded = placement.shards_weights  # placed by the strategy: it does not move with the LightningModule
        self._strategy, self._engine_pending, self._engine = strategy, placement.zero3, False

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self._runner()(*args, **kwargs)

    def run(self, function: Callable, *args):
        """``function(model, *args)`` run as the frozen model's forward, ``model`` being the Hugging Face model: its
        parts may be called one by one (the decoder, then the output head a tile at a time), each with its weights
        whole (FSDP: the outer unit's weights are gathered for the call, each decoder layer gathers its own; ZeRO-3:
        each submodule gathers its own as it runs). In the caller's gradient mode: the frozen weights take no
        gradient, but what ``function`` computes from other tensors may (a student's loss against a teacher's
        logits)."""
        runner = self._runner()
        inner = runner.module if self._engine else None  # DeepSpeed's engine calls its module's forward
        return run_as_forward(runner, function, *args, inner=inner)

    def _runner(self) -> torch.nn.Module:
        if self._engine_pending:
            self.module, self._engine_pending = zero3_inference_engine(self.module, self._strategy), False
            self._engine = True
        return self.module

    def release(self) -> None:
        """Free what the frozen model holds (a ZeRO-3 engine is destroyed); it cannot run afterwards."""
        if self._engine:
            self.module.destroy()
        self.module = None


def zero3_inference_engine(model: torch.nn.Module, strategy: Any) -> torch.nn.Module:
    """A ZeRO-3 partitioned ``model`` as a DeepSpeed engine without optimizer, whose forward gathers each layer's
    weights in turn: the config Lightning gives a model it only evaluates (the strategy's ZeRO section and precision,
    so the weights keep their dtype)."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": strategy.config["zero_optimization"],
              **{key: strategy.config[key] for key in ("fp16", "bf16") if key in strategy.config}}  # fmt: skip
    index = strategy.root_device.index  # None on CPU, where DeepSpeed takes the device from LOCAL_RANK
    args = argparse.Namespace(device_rank=index) if index is not None else None
    engine, *_ = deepspeed.initialize(args=args, model=model, config=config, dist_init_required=False)
    engine.eval()  # DeepSpeed's returns None
    return engine


def fsdp_wrapped(model: torch.nn.Module, strategy: Any) -> torch.nn.Module:
    """``model`` wrapped by FSDP as Lightning wraps the trained model: the strategy's precision (``*-true`` casts the
    weights), CPU offload and sharding, each of the model's own decoder layers a unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    settings = SimpleNamespace(kwargs=dict(strategy.kwargs))
    wrap_decoder_layers(settings, model)
    return FullyShardedDataParallel(strategy.precision_plugin.convert_module(model), cpu_offload=strategy.cpu_offload,
                                    mixed_precision=strategy.mixed_precision_config,
                                    sharding_strategy=strategy.sharding_strategy,
                                    device_id=strategy.root_device, **settings.kwargs)  # fmt: skip
