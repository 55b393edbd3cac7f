"""``model: distill``: the student learns the teacher's next-token distributions on the loss tokens of the data."""

from typing import Optional

import torch

from lt_posttrain import IGNORE_INDEX, Batch, FrozenModel, SFTModule, UserError, output_head, run_as_forward
from lt_posttrain_distill.losses import Divergence, softcapped, tile_tokens, tiled_divergence_sum, token_divergences


class DistillModule(SFTModule):
    """Knowledge distillation: at each of the student's loss tokens (the assistant tokens of the data), the divergence
    between the teacher's next-token distribution and the student's, both at ``temperature``; ``loss(batch)`` is their
    sum, so the step's loss is the mean over its loss tokens (token-weighted over micro-batches, accumulation and
    ranks, as SFT's; a weighted source scales its tokens' divergences).

    The teacher is a frozen model placed as the student is (``SFTModule.frozen_model``: a copy under one device and
    DDP, partitioned under DeepSpeed ZeRO-3, sharded under FSDP), in eval mode, in neither ``parameters()`` nor
    ``state_dict()`` (never optimized nor checkpointed); it gets the student's own inputs (packed samples attend only
    to themselves in both). The logits of neither model are held whole:
    both heads run a tile of loss tokens at a time from the final hidden states, and each tile's gradient is computed
    as it goes (:func:`~lt_posttrain_distill.tiled_divergence_sum`).

    Args:
        teacher_name_or_path: the teacher model (the forms of ``name_or_path``); it must share the student's
            vocabulary (the same tokenizer).
        divergence: ``forward_kl`` (``KL(teacher || student)``), ``reverse_kl`` (``KL(student || teacher)``) or
            ``jsd``, GKD's generalized Jensen-Shannon divergence with the teacher's weight ``beta`` in the mixture
            (see :func:`~lt_posttrain_distill.token_divergences`).
        beta: the teacher's weight in ``jsd``'s mixture, between 0 and 1 exclusive (TRL's ``GKDTrainer`` ``beta``).
        temperature: what both models' logits are divided by before the softmax.
        *args, **kwargs: :class:`~lt_posttrain.SFTModule`'s (``name_or_path`` is the student, ...).
    """

    def __init__(self, *args, teacher_name_or_path: str, divergence: Divergence = "jsd", beta: float = 0.5,
                 temperature: float = 1.0, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        if divergence == "jsd" and not 0 < beta < 1:
            raise UserError(f"model.beta must be between 0 and 1 (exclusive) for divergence jsd, got {beta}; "
                            "divergence forward_kl or reverse_kl are its ends")  # fmt: skip
        if temperature <= 0:
            raise UserError(f"model.temperature must be above 0, got {temperature}")
        self.prepare_frozen_model(teacher_name_or_path)  # a wrong path fails now, in one line
        self.teacher_name_or_path = teacher_name_or_path
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.teacher: Optional[FrozenModel] = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.teacher is None:
            self.teacher = self.frozen_model(self.teacher_name_or_path)
            student_vocab = output_head(self.model)[0].out_features
            teacher_vocab = output_head(self.teacher.module)[0].out_features
            if student_vocab != teacher_vocab:
                raise UserError(f"model.teacher_name_or_path: the teacher's vocabulary has {teacher_vocab} tokens, the "
                                f"student's {student_vocab}: distillation needs the same tokenizer")  # fmt: skip

    @property
    def teacher_model(self) -> Optional[torch.nn.Module]:
        """The teacher as it runs (under ZeRO-3, once run, its inference engine)."""
        return self.teacher.module if self.teacher is not None else None

    def _loss_tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The flat positions of the loss tokens, the student's final hidden states there, and their weights."""
        positions = (batch["targets"].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(-1)
        hidden = self.hidden_states(batch)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        weights = batch.get("target_weights")
        weights = (weights.reshape(-1).index_select(0, positions).float() if weights is not None
                   else torch.ones(len(positions), device=rows.device))  # fmt: skip
        return positions, rows, weights

    @torch.no_grad()
    def _teacher_logits(self, batch: Batch, positions: torch.Tensor):
        """``(start, end) -> the teacher's logits of the loss tokens start:end``: the teacher's final hidden states are
        computed once, its head runs a tile at a time. Each part runs as the teacher's forward, so a sharding strategy
        has its weights whole, and returns nothing that takes a gradient (the student's loss is no output of the
        teacher's forward, which a DeepSpeed engine would take for a loss of its own)."""

        def hidden_states(teacher: torch.nn.Module, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
            hidden = teacher.get_decoder()(**inputs).last_hidden_state
            return hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)

        def logits(teacher: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
            head, softcap = output_head(teacher)
            return softcapped(head(rows).float(), softcap)

        rows = self.teacher.run(hidden_states, self.model_inputs(batch), positions)
        return lambda start, end: self.teacher.run(logits, rows[start:end])  # called without gradients

    def loss(self, batch: Batch) -> torch.Tensor:
        """The *sum* of the divergences over the micro-batch's loss tokens, each scaled by its source's weight (the
        step divides by its loss tokens)."""
        positions, student_rows, weights = self._loss_tokens(batch)
        teacher_logits = self._teacher_logits(batch, positions)
        head, softcap = output_head(self.model)
        # as the student head's forward: a sharding strategy has its weight whole there
        return run_as_forward(head, lambda inner, rows, weights: tiled_divergence_sum(
            rows, inner, teacher_logits, weights, self.divergence, self.beta, self.temperature, softcap),
            student_rows, weights)  # fmt: skip

    @torch.no_grad()
    def token_divergences(self, batch: Batch) -> torch.Tensor:
        """The divergence at each position of the micro-batch (``batch["targets"]``' shape), 0 off the loss tokens,
        without gradients."""
        positions, student_rows, _ = self._loss_tokens(batch)
        teacher_logits = self._teacher_logits(batch, positions)
        head, softcap = output_head(self.model)
        tile = tile_tokens(head.out_features)
        values = [token_divergences(softcapped(head(student_rows[start : start + tile]).float(), softcap),
                                    teacher_logits(start, start + tile), self.divergence, self.beta, self.temperature)
                  for start in range(0, len(positions), tile)]  # fmt: skip
        out = torch.zeros(batch["targets"].numel(), dtype=torch.float32, device=student_rows.device)
        if values:
            out = out.index_put((positions,), torch.cat(values))
        return out.view(batch["targets"].shape)
