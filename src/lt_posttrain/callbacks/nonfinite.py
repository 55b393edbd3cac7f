"""``NonFiniteLossGuard``: a NaN or infinite loss stops the run (or skips the step) before it reaches the weights."""

from typing import Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lt_posttrain.errors import UserError
from lt_posttrain.training.optimizer_in_backward import StepsInBackward
from lt_posttrain.training.strategy import DEEPSPEED, distribution


class NonFiniteLossError(UserError):
    """The loss of an optimizer step was NaN or infinite and the run was told to stop."""


class NonFiniteLossGuard(L.Callback):
    """Watches the loss of every micro-batch; before an optimizer step whose loss (on any rank) is NaN or infinite:

    - ``stop``: ends the run with one line. The weights are not updated and no checkpoint is written, so the last
      checkpoint stays the last good one (``--ckpt_path last`` resumes from it).
    - ``skip``: drops the step's update (gradients cleared; the learning-rate schedule moves on), says so, and counts
      it in ``train/skipped_steps`` (logged every step in this mode; on a GPU the count may show a step late). Not
      with DeepSpeed, which keeps the gradients itself.

    With a fused torch optimizer (``adamw`` on GPU) the decision costs the GPU no wait: the optimizer skips the step
    on the device (its ``found_inf``, as under a gradient scaler) and the flag is read one step later, or before a
    checkpoint or the end of training, when it is long computed. Other optimizers read it before their step; with
    ``model.optimizer_in_backward``, which moves the weights during the backward pass, it is read before that.

    Args:
        action: ``stop`` or ``skip``.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop"):
        self.action = action
        self.skipped_steps = 0
        self._nonfinite = None  # micro-batches of the current step with a non-finite loss, on this rank
        self._pending: Optional[tuple[int, torch.Tensor, Optional[torch.cuda.Event]]] = None  # step, flag, copied
        self._flagged: Optional[torch.optim.Optimizer] = None  # the optimizer given a found_inf for its next step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.action == "skip" and distribution(trainer.strategy).family == DEEPSPEED:
            raise UserError("nonfinite_loss.action skip does not work with DeepSpeed: use stop (the default)")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).any().to(torch.int32)
        in_backward = _stepping_in_backward(trainer)
        if in_backward is None:
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad
        elif bad.item():  # the weights move in this backward (one device): decide now
            self._handle(trainer, pl_module, trainer.global_step + 1)
            in_backward.skip_backward = True

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        in_backward = _stepping_in_backward(trainer)
        if in_backward is not None:
            in_backward.skip_backward = False

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self._settle(trainer, pl_module)  # the previous step's flag: computed by now
        if self._nonfinite is None:
            return
        nonfinite, self._nonfinite = self._nonfinite, None
        bad = trainer.strategy.reduce(nonfinite.float(), reduce_op="sum") > 0  # every rank decides alike
        step = trainer.global_step + 1
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # Lightning's wrapper
        if skips_on_device(optimizer, trainer):
            optimizer.found_inf, self._flagged = bad.float(), optimizer
            self._pending = (step, *_copy_to_host(bad))
        elif bad.item():
            self._handle(trainer, pl_module, step)
            for parameter in pl_module.parameters():
                parameter.grad = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._flagged is not None:  # stepped: a flag left behind would skip a later step
            del self._flagged.found_inf
            self._flagged = None
        if self._pending is not None and (self._pending[2] is None or self._pending[2].query()):
            self._settle(trainer, pl_module)
        if self.action == "skip":
            pl_module.log("train/skipped_steps", torch.tensor(float(self.skipped_steps)))  # on the CPU: no GPU wait

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._settle(trainer, pl_module)  # a stop raises here, before anything is written

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._settle(trainer, pl_module)
        if self.skipped_steps:
            rank_zero_info(f"{self.skipped_steps} optimizer step(s) skipped for a NaN or infinite loss")

    def _settle(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Act on the flag of a step the optimizer already skipped on the device, if it was raised."""
        if self._pending is None:
            return
        (step, flag, copied), self._pending = self._pending, None
        if copied is not None:
            copied.synchronize()
        if flag.item():
            self._handle(trainer, pl_module, step)

    def _handle(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if self.action == "stop":
            last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise NonFiniteLossError(
                f"the loss of optimizer step {step} is NaN or infinite; stopped before updating the weights (last "
                f"checkpoint: {last}); lower model.learning_rate, set trainer.gradient_clip_val or check the data, or "
                "set nonfinite_loss.action skip"
            )
        self.skipped_steps += 1
        rank_zero_info(
            f"the loss of optimizer step {step} is NaN or infinite: update skipped ({self.skipped_steps} so far)"
        )

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)


def _stepping_in_backward(trainer: L.Trainer) -> Optional[StepsInBackward]:
    return next((each for each in trainer.optimizers if isinstance(each, StepsInBackward)), None)


def skips_on_device(optimizer: torch.optim.Optimizer, trainer: L.Trainer) -> bool:
    """A fused torch optimizer honours ``found_inf`` in its kernel; a gradient scaler sets it itself."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and scaler is None


def _copy_to_host(flag: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """``flag`` copied to pinned host memory without waiting, and the event that marks the copy done."""
    if flag.device.type != "cuda":
        return flag, None
    host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied
