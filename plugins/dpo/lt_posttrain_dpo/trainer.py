"""``model: dpo``: Direct Preference Optimization (Rafailov et al., 2023) with the sigmoid loss."""

from typing import Optional

import torch

from lt_posttrain import Batch, FrozenModel, SFTModule, UserError
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

    The reference is a frozen model placed as the trained one is (``SFTModule.frozen_model``): in neither
    ``parameters()`` (so not optimized) nor ``state_dict()`` (so not checkpointed), yet moving and casting with the
    module; under DeepSpeed ZeRO-3 created straight into its partitions and run by an inference engine that gathers one
    layer's weights at a time; under FSDP wrapped with the strategy's settings, each decoder layer a unit.

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
            self.prepare_frozen_model(reference_name_or_path)  # a wrong path fails now, in one line
        self.beta, self.precomputed_reference = beta, precomputed_reference
        self.reference_name_or_path = reference_name_or_path
        self.reference: Optional[FrozenModel] = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if stage != "predict" and datamodule is not None and not isinstance(datamodule, PreferenceDataModule):
            raise UserError("model dpo learns from preference pairs: set data.class_path to preference (sources "
                            "of type preference_pairs, rows {prompt or messages, chosen, rejected})")  # fmt: skip

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference is None and not self.precomputed_reference:
            self.reference = self.frozen_model(self.reference_name_or_path)

    @property
    def reference_model(self) -> Optional[torch.nn.Module]:
        """The reference model as it runs (under ZeRO-3, once run, its inference engine); None with
        ``precomputed_reference``."""
        return self.reference.module if self.reference is not None else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [key for key in state if key.startswith("reference_model.")]:  # saved by versions that kept it
            del state[key]

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """``[pairs, 2]``: the reference log-probabilities of each pair's chosen and rejected answer."""
        if self.precomputed_reference:
            reference = batch["reference_logps"]
            if torch.isnan(reference).any():
                raise UserError("model.precomputed_reference: a pair has no reference log-probabilities: give every "
                                "row reference_chosen_logp and reference_rejected_logp")  # fmt: skip
            return reference
        return pair_logps(self.reference(**self.model_inputs(batch)).logits, batch)

    def pair_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(losses [pairs], rewards [pairs, 2])`` of a micro-batch of pairs (see :func:`dpo_loss`)."""
        return dpo_loss(pair_logps(self(batch), batch), self.reference_logps(batch), self.beta)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The *sum* of the micro-batch's pair losses (the step divides by its number of pairs)."""
        losses, rewards = self.pair_losses(batch)
        stage = "train" if self.trainer.training else "test" if self.trainer.testing else "val"
        margins = (rewards[:, 0] - rewards[:, 1]).detach()
        self.log(f"{stage}/reward_accuracy", (margins > 0).float().mean(), batch_size=len(margins))
        self.log(f"{stage}/reward_margin", margins.mean(), batch_size=len(margins))
        return losses.sum()

