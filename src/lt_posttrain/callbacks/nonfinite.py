"""``NonFiniteLossGuard``: a NaN or infinite loss stops the run (or skips the step) before it reaches the weights."""

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lt_posttrain.errors import UserError


class NonFiniteLossError(UserError):
    """The loss of an optimizer step was NaN or infinite and the run was told to stop."""


class NonFiniteLossGuard(L.Callback):
    """Watches the loss of every micro-batch; before an optimizer step whose loss (on any rank) is NaN or infinite:

    - ``stop``: ends the run with one line. The weights are not updated and no checkpoint is written, so the last
      checkpoint stays the last good one (``--ckpt_path last`` resumes from it).
    - ``skip``: drops the step's update (gradients cleared; the learning-rate schedule moves on), says so, and counts
      it in ``train/skipped_steps`` (logged every step in this mode). Not with DeepSpeed, which keeps the gradients
      itself.

    Args:
        action: ``stop`` or ``skip``.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop"):
        self.action = action
        self.skipped_steps = 0
        self._nonfinite = None  # micro-batches of the current step with a non-finite loss, on this rank

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.action == "skip" and "deepspeed" in type(trainer.strategy).__name__.lower():
            raise UserError("nonfinite_loss.action skip does not work with DeepSpeed: use stop (the default)")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).any().to(torch.int32)
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self._nonfinite is None:
            return
        nonfinite, self._nonfinite = self._nonfinite, None
        if trainer.strategy.reduce(nonfinite.float(), reduce_op="sum").item() == 0:  # every rank decides alike
            if self.action == "skip":
                pl_module.log("train/skipped_steps", float(self.skipped_steps))
            return
        step = trainer.global_step + 1
        if self.action == "stop":
            last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise NonFiniteLossError(
                f"the loss of optimizer step {step} is NaN or infinite; stopped before updating the weights (last "
                f"checkpoint: {last}); lower model.learning_rate, set trainer.gradient_clip_val or check the data, or "
                "set nonfinite_loss.action skip"
            )
        for parameter in pl_module.parameters():
            parameter.grad = None
        self.skipped_steps += 1
        pl_module.log("train/skipped_steps", float(self.skipped_steps))
        rank_zero_info(
            f"the loss of optimizer step {step} is NaN or infinite: update skipped ({self.skipped_steps} so far)"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.skipped_steps:
            rank_zero_info(f"{self.skipped_steps} optimizer step(s) skipped for a NaN or infinite loss")

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)
