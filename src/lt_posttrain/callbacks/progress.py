"""Progress of a run: a live bar on a terminal, one line every few steps where output goes to a file (CI, nohup,
SLURM), where a live bar prints nothing until it stops."""

import time
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info


def batches_to_max_steps(trainer: L.Trainer, epoch_batches, step: int, done: int):
    """The batches of this epoch the run goes through: the epoch's ``epoch_batches``, or fewer when ``max_steps``
    ends the run first (in micro-batches: ``accumulate_grad_batches`` of them a step), counted from the optimizer
    step ``step`` at which ``done`` of them had run (0 at an epoch's start, more in a resumed one)."""
    if trainer.max_steps is None or trainer.max_steps < 0:
        return epoch_batches
    return min(epoch_batches, done + (trainer.max_steps - step) * trainer.accumulate_grad_batches)


def total_steps(trainer: L.Trainer, module: L.LightningModule) -> Optional[int]:
    """The optimizer steps of the whole run: ``max_steps``, or what the trainer counts from the data
    (``SFTModule.total_optimizer_steps``); None when neither is known."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.max_steps
    count = getattr(module, "total_optimizer_steps", None)
    return count() if callable(count) else None


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def _value(value) -> str:
    value = float(value)
    return f"{value:.4f}" if 1e-2 <= abs(value) < 1e4 else f"{value:.4g}"


class StepsBar(RichProgressBar):
    """Lightning's live bar, its total the batches up to ``max_steps`` (Lightning's counts the epoch's unless
    ``max_epochs`` is -1, and then forgets accumulation and a resumed epoch's batches), without the logger's version
    number among the metrics."""

    _epoch_start: Optional[tuple] = None  # (optimizer step, the epoch's batches done) where this epoch's bar began

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._epoch_start = (trainer.global_step, 0)
        super().on_train_epoch_start(trainer, module)

    @property
    def total_train_batches(self):
        if self._epoch_start is None:  # resumed mid-epoch: Lightning skips on_train_epoch_start, the bar begins at
            progress = self.trainer.fit_loop.epoch_loop.batch_progress.current  # the end of the first batch
            self._epoch_start = (self.trainer.global_step, progress.ready)
        # the epoch's batches; Lightning's own total (with max_epochs -1) forgets accumulation and a resumed epoch
        return batches_to_max_steps(self.trainer, self.trainer.num_training_batches, *self._epoch_start)

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)
        return metrics


class StepLines(ProgressBar):
    """Progress as a line every ``every_n_steps`` optimizer steps and at the last, for output that is not a
    terminal::

        step 10/40 · train/loss 1.873 · 310 tokens/s · 0:00:41 elapsed, 0:02:04 left

    The metrics are those a bar shows (logged with ``prog_bar=True``); tokens/s is the throughput meter's
    (``throughput/tokens_per_s``, from its first window after the warm-up); the time left is the mean time of this
    run's steps so far times the steps to go. A validation's metrics get a line of their own.

    Args:
        every_n_steps: steps between two lines; default: the trainer's ``log_every_n_steps``.
    """

    def __init__(self, every_n_steps: Optional[int] = None):
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._last_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._first_step, self._started = trainer.global_step, time.perf_counter()
        self._total = total_steps(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self._enabled or step == self._last_step:  # inside an accumulation window
            return
        self._last_step = step
        every = max(self.every_n_steps or trainer.log_every_n_steps, 1)
        if step % every and step != self._total:
            return
        elapsed = time.perf_counter() - self._started
        parts = [f"step {step}/{self._total}" if self._total else f"step {step}"]
        metrics = self.get_metrics(trainer, module)
        metrics.pop("v_num", None)
        parts += [f"{name} {_value(value)}" for name, value in metrics.items() if not name.startswith("val")]
        tokens_per_s = trainer.callback_metrics.get("throughput/tokens_per_s")
        if tokens_per_s is not None and step % max(trainer.log_every_n_steps, 1) == 0:  # the meter's, of this step
            parts.append(f"{float(tokens_per_s):,.0f} tokens/s")
        timing = f"{_clock(elapsed)} elapsed"
        if self._total and step > self._first_step:
            timing += f", {_clock(elapsed / (step - self._first_step) * (self._total - step))} left"
        rank_zero_info(" · ".join(parts + [timing]))

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {name: value for name, value in self.get_metrics(trainer, module).items() if name.startswith("val")}
        if metrics:
            rank_zero_info(f"validation at step {trainer.global_step}: "
                           + " · ".join(f"{name} {_value(value)}" for name, value in metrics.items()))  # fmt: skip


def output_is_terminal() -> bool:
    """Whether a live bar can draw: stdout is a terminal or a notebook, as ``rich`` (which draws it) decides, its
    ``FORCE_TERMINAL`` and ``TTY_COMPATIBLE`` settings included."""
    from rich.console import Console

    console = Console()
    return console.is_terminal or console.is_jupyter


def progress_bar() -> ProgressBar:
    """:class:`StepsBar` where a live bar can draw (:func:`output_is_terminal`), else :class:`StepLines`."""
    return StepsBar() if output_is_terminal() else StepLines()
