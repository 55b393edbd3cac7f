"""A callback for tests of two runs at once: the training process stops at a step until the test lets it go."""

import time
from pathlib import Path

import lightning as L


class WaitAtStep(L.Callback):
    """Once ``trainer.global_step`` reaches ``step`` (its checkpoint written), create ``ready`` and wait until ``go``
    exists (at most ``timeout`` seconds).

    Args:
        step: the optimizer step to wait after.
        ready: the file created on arriving.
        go: the file waited for.
        timeout: seconds to wait at most.
    """

    def __init__(self, step: int, ready: str, go: str, timeout: float = 300.0):
        self.step, self.ready, self.go, self.timeout = step, Path(ready), Path(go), timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step < self.step or self.ready.exists():
            return
        self.ready.write_text("")
        deadline = time.monotonic() + self.timeout
        while not self.go.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
