"""``model: kto``: Kahneman-Tversky Optimization (Ethayarajh et al., 2024) from labelled answers."""

from typing import Optional

import torch

from lt_posttrain import Batch, FrozenModel, SFTModule, UserError, output_head, sum_per_sample, tiled_token_logps
from lt_posttrain_kto.datamodule import UnpairedPreferenceDataModule
from lt_posttrain_kto.loss import LossType, kl_estimate, kto_losses


class KTOModule(SFTModule):
    """KTO: per answer, ``1 - sigmoid(beta * (r - z0))`` if it is desirable and ``1 - sigmoid(beta * (z0 - r))`` if
    not, each times its kind's weight, where ``r = log pi(answer) - log ref(answer)`` (summed over the answer's tokens,
    the trained model against the frozen reference) and ``z0`` is the KL estimate: the mean of the same difference
    over mismatched (prompt, another row's answer) pairs of the optimizer step, clamped at 0, without gradient. Needs
    ``data: {class_path: unpaired_preference}``.

    ``loss(batch)`` returns the sum over the micro-batch's answers and the step divides by its number of answers, so
    ``train/loss`` is the mean over answers. ``z0`` is computed once per optimizer step, on its first micro-batch,
    over the mismatched pairs of every micro-batch of the step on every rank (a sum, then a sum over ranks): the loss
    and the gradient do not change with the batch size, accumulation or GPU count. TRL's ``KTOTrainer`` takes it per
    micro-batch (averaged over ranks); the two agree when a step is one micro-batch on one GPU. In validation and
    test, each micro-batch's own pairs give its ``z0``. Also logged: ``train/kl`` (``z0``), and
    ``train/rewards_desirable`` and ``train/rewards_undesirable``, the mean implicit reward ``beta * r`` of each kind
    (``val/``, ``test/`` alike).

    Both models' log-probabilities come from their final hidden states, the output head run a tile of answer tokens
    at a time (``lt_posttrain.tiled_token_logps``): the ``[tokens, vocab]`` logits are never held. The reference is a
    frozen model placed as the trained one is (``SFTModule.frozen_model``), under DDP, DeepSpeed ZeRO-3 and FSDP.

    Args:
        beta: how strongly the loss holds the model near the reference.
        desirable_weight: what a desirable answer's loss is multiplied by.
        undesirable_weight: what an undesirable answer's loss is multiplied by. With unequal numbers of each kind,
            the KTO paper keeps ``desirable_weight * desirable / (undesirable_weight * undesirable)`` in [1, 4/3].
        loss_type: ``kto``; or ``apo_zero_unpaired`` (APO-zero, no KL estimate: ``1 - sigmoid(beta * r)`` for a
            desirable answer, ``sigmoid(beta * r)`` for an undesirable one).
        reference_name_or_path: the frozen reference model (the forms of ``name_or_path``, same tokenizer); default:
            a copy of the model as training starts.
        *args, **kwargs: :class:`~lt_posttrain.SFTModule`'s (``name_or_path``, ``learning_rate``, ...).
    """

    def __init__(self, *args, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 loss_type: LossType = "kto", reference_name_or_path: Optional[str] = None, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        if beta <= 0:
            raise UserError(f"model.beta must be above 0, got {beta}")
        for key, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            if weight < 0:
                raise UserError(f"model.{key} must be 0 or above, got {weight}")
        if loss_type not in ("kto", "apo_zero_unpaired"):
            raise UserError(f"model.loss_type must be kto or apo_zero_unpaired, got {loss_type!r}")
        if reference_name_or_path:
            self.prepare_frozen_model(reference_name_or_path)  # a wrong path fails now, in one line
        self.beta, self.loss_type = beta, loss_type
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.reference_name_or_path = reference_name_or_path
        self.reference: Optional[FrozenModel] = None
        self._step_kl: Optional[torch.Tensor] = None  # z0 of the optimizer step under way

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = self.trainer.datamodule
        if stage == "predict" or data is None:
            return
        if not isinstance(data, UnpairedPreferenceDataModule):
            raise UserError("model kto learns from labelled answers: set data.class_path to unpaired_preference "
                            "(sources of type labelled_completions, rows {prompt or messages, completion, "
                            "label})")  # fmt: skip
        rows_per_step = data.batch_size * self.trainer.accumulate_grad_batches * self.trainer.world_size
        if stage == "fit" and self.loss_type == "kto" and rows_per_step < 2 and not data.packing:
            raise UserError("model kto: an optimizer step of one answer pairs its prompt with its own answer, so the "
                            "KL estimate is its reward: raise data.batch_size or trainer.accumulate_grad_batches, "
                            "or set model.loss_type apo_zero_unpaired")  # fmt: skip

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference is None:
            self.reference = self.frozen_model(self.reference_name_or_path)

    @property
    def reference_model(self) -> Optional[torch.nn.Module]:
        """The reference model as it runs (under ZeRO-3, once run, its inference engine)."""
        return self.reference.module if self.reference is not None else None

    # -- log-probabilities ---------------------------------------------------------------------------------------
    def policy_logps(self, batch: Batch) -> torch.Tensor:
        """``[answers]``: the trained model's log-probability of each answer of ``batch``."""
        head, softcap = output_head(self.model)
        return sum_per_sample(tiled_token_logps(self.hidden_states(batch), head, batch["targets"], softcap), batch)

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """``[answers]``: the reference model's log-probability of each answer, without gradient (run as the
        reference's own forward, so a sharded reference has its weights whole)."""

        def logps(model: torch.nn.Module, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
            head, softcap = output_head(model)
            return tiled_token_logps(model.get_decoder()(**inputs).last_hidden_state, head, targets, softcap)

        with torch.no_grad():
            return sum_per_sample(self.reference.run(logps, self.model_inputs(batch), batch["targets"]), batch)

    # -- the KL estimate and the loss ------------------------------------------------------------------------------
    def kl_sums(self, batch: Batch) -> torch.Tensor:
        """``[sum, count]`` of ``log pi - log ref`` over the mismatched pairs of ``batch["kl_batches"]`` (this rank's
        share of the step), without gradient."""
        sums = torch.zeros(2, device=self.device, dtype=torch.float32)
        with torch.no_grad():
            for kl_batch in batch["kl_batches"]:
                differences = self.policy_logps(kl_batch) - self.reference_logps(kl_batch)
                sums += torch.stack([differences.sum(), torch.tensor(float(len(differences)), device=sums.device)])
        return sums

    def kl(self, batch: Batch, training: bool) -> torch.Tensor:
        """``z0`` for ``batch``: in training, the step's (computed on its first micro-batch over every rank's
        mismatched pairs, then kept for the step's other micro-batches); else the micro-batch's own."""
        if self.loss_type != "kto":
            return torch.zeros((), device=self.device)
        if not training:
            return kl_estimate(*self.kl_sums(batch))
        if batch["kl_batches"]:
            self._step_kl = kl_estimate(*self.trainer.strategy.reduce(self.kl_sums(batch), reduce_op="sum"))
        elif self._step_kl is None:
            raise RuntimeError("KTO: a micro-batch that does not start its optimizer step came first; its step's KL "
                               "estimate was never computed (a run resumed inside an accumulation window?)")
        return self._step_kl

    def answer_losses(self, batch: Batch, training: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(losses [answers], rewards [answers], z0)`` of a micro-batch (see :func:`kto_losses`)."""
        kl = self.kl(batch, training)
        losses, rewards = kto_losses(self.policy_logps(batch), self.reference_logps(batch), batch["desirable"], kl,
                                     self.beta, self.desirable_weight, self.undesirable_weight,
                                     self.loss_type)  # fmt: skip
        return losses, rewards, kl

    def loss(self, batch: Batch) -> torch.Tensor:
        """The *sum* of the micro-batch's answer losses (the step divides by its number of answers)."""
        losses, rewards, kl = self.answer_losses(batch, training=self.trainer.training)
        stage = "train" if self.trainer.training else "test" if self.trainer.testing else "val"
        self.log(f"{stage}/kl", kl, batch_size=len(losses))
        desirable = batch["desirable"]
        for name, kind in (("desirable", desirable), ("undesirable", ~desirable)):
            count = int(kind.sum())
            if count:
                self.log(f"{stage}/rewards_{name}", rewards[kind].mean(), batch_size=count)
        return losses.sum()

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self._step_kl = None  # the next micro-batch starts a step
