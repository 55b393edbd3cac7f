"""``model: dpo``: Direct Preference Optimization (Rafailov et al., 2023) with the sigmoid loss."""

import argparse
import copy
from types import SimpleNamespace
from typing import Any, Optional

import torch

from lt_posttrain import SFTModule
from lt_posttrain.errors import UserError
from lt_posttrain.model.kernels import apply_liger_kernels
from lt_posttrain.model.loading import import_model_code, load_causal_lm, resolve_model_path
from lt_posttrain.training.sharding import is_fsdp, sharded_creation, wrap_decoder_layers, zero3_config
from lt_posttrain_dpo.datamodule import PreferenceDataModule
from lt_posttrain_dpo.loss import dpo_loss, pair_logps


class DPOModule(SFTModule):
    """DPO: per pair, ``-log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log
    ref(rejected))))``, where ``log pi(answer)`` sums the log-probabilities of the answer's tokens under the trained
    model and ``ref`` is the frozen reference model. Needs ``data: {class_path: preference}``.

    ``loss(batch)`` returns the sum over the micro-batch's pairs and the step divides by its number of pairs, so
    ``train/loss`` and ``val/loss`` are means over pairs and the gradient does not change with the batching. Also
    logged: ``train/reward_accuracy`` (``val/``, ``test/``), the share of pairs whose chosen answer has the larger
    implicit reward ``beta * (log pi - log ref)``, and ``train/reward_margin``, the mean difference of the two.

    The reference is held outside the module tree: it is in neither ``parameters()`` (so not optimized) nor
    ``state_dict()`` (so not checkpointed), yet moves and casts with the module as a submodule would. Under sharding it
    is created as the model is (see :meth:`build_reference_model`): under DeepSpeed ZeRO-3 straight into its
    partitions, then run by a DeepSpeed inference engine that gathers one layer's weights at a time; under FSDP
    wrapped with the strategy's settings, each decoder layer a unit.

    Args:
        beta: how strongly the loss holds the model near the reference (DPO's temperature).
        reference_name_or_path: the frozen reference model (the forms of ``name_or_path``, same tokenizer);
            default: a copy of the model as training starts.
        precomputed_reference: take each pair's reference log-probabilities from the data (the rows'
            ``reference_chosen_logp`` and ``reference_rejected_logp``) instead of running a reference model;
            none is loaded.
        *args, **kwargs: :class:`~lt_posttrain.SFTModule`'s (``name_or_path``, ``learning_rate``, ...).
    """

    def __init__(self, *args, beta: float = 0.1, reference_name_or_path: Optional[str] = None,
                 precomputed_reference: bool = False, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        if beta <= 0:
            raise UserError(f"model.beta must be above 0, got {beta}")
        if precomputed_reference and reference_name_or_path:
            raise UserError("model.precomputed_reference reads the reference log-probabilities from the data: remove "
                            "model.reference_name_or_path, or set precomputed_reference: false")  # fmt: skip
        if reference_name_or_path:
            resolve_model_path(reference_name_or_path)  # a wrong path fails now, in one line
            import_model_code(reference_name_or_path, self.hparams.trust_remote_code)  # before any zero.Init
        self.beta, self.precomputed_reference = beta, precomputed_reference
        self.reference_name_or_path = reference_name_or_path
        self.reference_model = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if stage != "predict" and datamodule is not None and not isinstance(datamodule, PreferenceDataModule):
            raise UserError("model dpo learns from preference pairs: set data.class_path to preference (sources "
                            "of type preference_pairs, rows {prompt or messages, chosen, rejected})")  # fmt: skip

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference_model is None and not self.precomputed_reference:
            object.__setattr__(self, "reference_model", self.build_reference_model())  # not registered as a submodule

    def build_reference_model(self) -> torch.nn.Module:
        """The frozen reference: ``reference_name_or_path`` loaded as the model is, else the model as training starts.

        Under DeepSpeed ZeRO-3 it loads inside the model's creation context, so each rank holds only its partitions;
        the model's own weights then come from :meth:`build_model` again (partitions do not copy), with the same Liger
        kernels. Elsewhere the model is copied; under FSDP the reference is then wrapped as the model will be.
        """
        hp = self.hparams
        strategy = self._trainer.strategy if self._trainer is not None else None
        with sharded_creation(strategy):
            if self.reference_name_or_path:
                model = load_causal_lm(self.reference_name_or_path, hp.dtype, hp.attn_implementation,
                                       hp.trust_remote_code)  # fmt: skip
            elif zero3_config(strategy) is not None:
                model = self.build_model()
                if self.liger_kernels:
                    apply_liger_kernels(model, self.liger)
            else:
                model = copy.deepcopy(self.model)
        model.eval().requires_grad_(False)
        return fsdp_wrapped(model, strategy) if is_fsdp(strategy) else model

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference_model is not None:
            self.reference_model.eval()  # the reference scores without dropout, always
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        reference = self.__dict__.get("reference_model")
        if reference is not None and not is_sharded(reference):  # the strategy places a sharded one
            reference._apply(fn, recurse)
        return self

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [key for key in state if key.startswith("reference_model.")]:  # saved by versions that kept it
            del state[key]

    def _runnable_reference(self) -> torch.nn.Module:
        """The reference to call; under ZeRO-3 its inference engine, made on first use (after the strategy has set up
        the model's engine, outside the creation context)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if zero3_config(strategy) is not None:
            from deepspeed import DeepSpeedEngine

            if not isinstance(self.reference_model, DeepSpeedEngine):
                object.__setattr__(self, "reference_model", zero3_inference_engine(self.reference_model, strategy))
        return self.reference_model

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """``[pairs, 2]``: the reference log-probabilities of each pair's chosen and rejected answer."""
        if self.precomputed_reference:
            reference = batch["reference_logps"]
            if torch.isnan(reference).any():
                raise UserError("model.precomputed_reference: a pair has no reference log-probabilities: give every "
                                "row reference_chosen_logp and reference_rejected_logp")  # fmt: skip
            return reference
        with torch.no_grad():
            return pair_logps(self._runnable_reference()(**self.model_inputs(batch)).logits, batch)

    def pair_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(losses [pairs], rewards [pairs, 2])`` of a micro-batch of pairs (see :func:`dpo_loss`)."""
        return dpo_loss(pair_logps(self(batch), batch), self.reference_logps(batch), self.beta)

    def loss(self, batch: dict) -> torch.Tensor:
        """The *sum* of the micro-batch's pair losses (the step divides by its number of pairs)."""
        losses, rewards = self.pair_losses(batch)
        stage = "train" if self.trainer.training else "test" if self.trainer.testing else "val"
        margins = (rewards[:, 0] - rewards[:, 1]).detach()
        self.log(f"{stage}/reward_accuracy", (margins > 0).float().mean(), batch_size=len(margins))
        self.log(f"{stage}/reward_margin", margins.mean(), batch_size=len(margins))
        return losses.sum()


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is FSDP-wrapped or partitioned by ZeRO-3."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel) or any(hasattr(p, "ds_id") for p in model.parameters())


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
