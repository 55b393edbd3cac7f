"""A callback for resume tests: the training process kills itself (SIGKILL, no clean-up) once a step is done."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """Kill this process with SIGKILL in ``on_train_batch_end`` once ``trainer.global_step`` reaches ``step`` (before
    the checkpoint of that step, which Lightning writes after every other callback has run).

    Args:
        step: the optimizer step after which to die.
    """

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
