"""When a fit started and when its first step ended: a Lightning callback for `bench/speed.py ours`, which reports
the first step's time (a compiled run compiles there) apart from the steady state's tokens/s."""

import time

import lightning as L
import torch


class FirstStepClock(L.Callback):
    """``fit_start`` and ``step_end``: ``time.perf_counter()`` at the fit's start (the model built and placed) and at
    the end of its first training batch (after the GPU has finished it)."""

    fit_start = step_end = None

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.fit_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.step_end is None:
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            self.step_end = time.perf_counter()
