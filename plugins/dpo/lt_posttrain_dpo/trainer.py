"""``model: dpo``: Direct Preference Optimization (Rafailov et al., 2023) with the sigmoid loss."""

import math
from typing import Optional

import torch

from lt_posttrain import Batch, FrozenModel, MicroBatch, SFTModule, UserError, output_head, tiled_token_logps
from lt_posttrain_dpo.datamodule import PreferenceDataModule
from lt_posttrain_dpo.loss import dpo_loss, pair_sums


class DPOModule(SFTModule):
    """DPO: per pair, ``-log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log
    ref(rejected))))``, where ``log pi(answer)`` sums the log-probabilities of the answer's tokens under the trained
    model and ``ref`` is the frozen reference model. Needs ``data: {class_path: preference}``.

    ``loss(batch)`` returns the sum over the micro-batch's pairs and the step divides by its number of pairs, so
    ``train/loss`` and ``val/loss`` are means over pairs and the gradient does not change with the batching. Also
    logged: ``train/reward_accuracy`` (``val/``, ``test/``), the share of pairs whose chosen answer has the larger
    implicit reward ``beta * (log pi - log ref)``, and ``train/reward_margin``, the mean difference of the two.

    The log-probabilities of both models come from their final hidden states, the output head run a tile of answer
    tokens at a time (``lt_posttrain.tiled_token_logps``): the ``[tokens, vocab]`` logits are never held, and a
    prompt's tokens never reach the head.

    The reference is a frozen model placed as the trained one is (``SFTModule.frozen_model``): in neither
    ``parameters()`` (so not optimized) nor ``state_dict()`` (so not checkpointed), yet moving and casting with the
    module; under DeepSpeed ZeRO-3 created straight into its partitions and run by an inference engine that gathers one
    layer's weights at a time; under FSDP wrapped with the strategy's settings, each decoder layer a unit.

    Args:
        beta: how strongly the loss holds the model near the reference (DPO's temperature).
        reference_name_or_path: the frozen reference model (the forms of ``name_or_path``, same tokenizer);
            default: a copy of the model as training starts.
        precompute_reference: run the reference once over every training and validation pair before the first step
            (each rank its share, in the micro-batches training uses) and keep only their log-probabilities; the
            reference model is then freed, so it is not held while training. A resumed run computes them again
            (the reference is the same: the checkpoint holds the trained model only).
        precomputed_reference: take each pair's reference log-probabilities from the data (the rows'
            ``reference_chosen_logp`` and ``reference_rejected_logp``) instead of running a reference model;
            none is loaded.
        *args, **kwargs: :class:`~lt_posttrain.SFTModule`'s (``name_or_path``, ``learning_rate``, ...).
    """

    def __init__(self, *args, beta: float = 0.1, reference_name_or_path: Optional[str] = None,
                 precompute_reference: bool = False, precomputed_reference: bool = False, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        if beta <= 0:
            raise UserError(f"model.beta must be above 0, got {beta}")
        if precomputed_reference and reference_name_or_path:
            raise UserError("model.precomputed_reference reads the reference log-probabilities from the data: remove "
                            "model.reference_name_or_path, or set precomputed_reference: false")  # fmt: skip
        if precomputed_reference and precompute_reference:
            raise UserError("model.precomputed_reference reads the reference log-probabilities from the data and "
                            "model.precompute_reference computes them before training: set one of them")  # fmt: skip
        if reference_name_or_path:
            self.prepare_frozen_model(reference_name_or_path)  # a wrong path fails now, in one line
        self.beta, self.precomputed_reference = beta, precomputed_reference
        self.precompute_reference = precompute_reference
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
        ``precomputed_reference``, and once ``precompute_reference`` has freed it."""
        return self.reference.module if self.reference is not None else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [key for key in state if key.startswith("reference_model.")]:  # saved by versions that kept it
            del state[key]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.precompute_reference and self.reference is not None:
            data = self.trainer.datamodule
            for split in ("train", "val"):
                samples, packs = getattr(data, f"{split}_samples"), getattr(data, f"{split}_packs")
                if samples is not None and len(samples):
                    data.set_reference_logps(split, self._reference_logps_of(data, samples, packs))
            self.release_frozen_model(self.reference)
            self.reference = None

    @torch.no_grad()
    def _reference_logps_of(self, data: PreferenceDataModule, samples, packs: list[list[int]]) -> torch.Tensor:
        """``[samples, 2]``: the reference log-probabilities of every pair of ``samples``, on every rank. The
        micro-batches are the plan's without shuffling (``data.batch_size`` packs each, dealt to ranks in turn), so a
        run that does not shuffle scores each pair as training would; each rank scores its share, then a sum over ranks
        gives every rank all of them."""
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        groups = [packs[start : start + data.batch_size] for start in range(0, len(packs), data.batch_size)]
        mine = groups[rank::world_size]
        dataset = data.batch_dataset(samples)
        values = torch.zeros(len(samples), 2, dtype=torch.float64, device=self.device)
        for turn in range(math.ceil(len(groups) / world_size)):
            # a rank whose share is shorter runs one more anyway: ZeRO-3 and FSDP gather weights with every rank
            group = mine[turn] if turn < len(mine) else groups[0]
            batch = self.trainer.strategy.batch_to_device(dataset[MicroBatch(tuple(map(tuple, group)), 0, 0)])
            logps = self.live_reference_logps(batch)
            if turn < len(mine):
                values[torch.tensor([index for pack in group for index in pack], device=self.device)] = logps.double()
        return self.trainer.strategy.reduce(values, reduce_op="sum").cpu()

    def policy_logps(self, batch: Batch) -> torch.Tensor:
        """``[pairs, 2]``: the trained model's log-probabilities of each pair's chosen and rejected answer."""
        head, softcap = output_head(self.model)
        return pair_sums(tiled_token_logps(self.hidden_states(batch), head, batch["targets"], softcap), batch)

    def live_reference_logps(self, batch: Batch) -> torch.Tensor:
        """``[pairs, 2]``: the reference model's log-probabilities of each pair's answers, computed now (as
        :meth:`policy_logps`, run as the reference's forward so a sharded reference has its weights whole)."""

        def logps(model: torch.nn.Module, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
            head, softcap = output_head(model)
            return tiled_token_logps(model.get_decoder()(**inputs).last_hidden_state, head, targets, softcap)

        with torch.no_grad():
            return pair_sums(self.reference.run(logps, self.model_inputs(batch), batch["targets"]), batch)

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """``[pairs, 2]``: the reference log-probabilities of each pair's chosen and rejected answer: from the batch
        (``precomputed_reference``, or once ``precompute_reference`` has computed them), else from the reference."""
        if self.reference is not None and not self.precomputed_reference:
            return self.live_reference_logps(batch)
        reference = batch["reference_logps"]
        if torch.isnan(reference).any():
            raise UserError("model.precomputed_reference: a pair has no reference log-probabilities: give every "
                            "row reference_chosen_logp and reference_rejected_logp")  # fmt: skip
        return reference

    def pair_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(losses [pairs], rewards [pairs, 2])`` of a micro-batch of pairs (see :func:`dpo_loss`)."""
        return dpo_loss(self.policy_logps(batch), self.reference_logps(batch), self.beta)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The *sum* of the micro-batch's pair losses (the step divides by its number of pairs)."""
        losses, rewards = self.pair_losses(batch)
        stage = "train" if self.trainer.training else "test" if self.trainer.testing else "val"
        margins = (rewards[:, 0] - rewards[:, 1]).detach()
        self.log(f"{stage}/reward_accuracy", (margins > 0).float().mean(), batch_size=len(margins))
        self.log(f"{stage}/reward_margin", margins.mean(), batch_size=len(margins))
        return losses.sum()
