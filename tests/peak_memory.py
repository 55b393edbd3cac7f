"""A callback for memory tests: how much a run adds to the process's resident memory, and while training."""

import json
from pathlib import Path

import lightning as L
import psutil


class PeakMemory(L.Callback):
    """Writes ``{"peak", "before_run", "grown_while_training"}`` (bytes) to ``out`` when training ends: the process's
    peak resident set (``VmHWM``), its resident set when the callback was built (libraries imported; no model, no
    data yet), and the largest resident set seen after a training batch less the one at the start of training.

    The peak is the process's own high-water mark (``VmHWM``), not ``ru_maxrss``: a process started by
    ``subprocess`` inherits in ``ru_maxrss`` the peak of the process that started it (Linux carries the old memory
    map's high-water mark over ``exec``), which in a whole test session is the test runner's few GB.

    Args:
        out: the JSON file to write.
    """

    def __init__(self, out: str):
        self.out = out
        self.process = psutil.Process()
        self.before_run = self.process.memory_info().rss
        self.start = self.highest = 0

    def on_train_start(self, trainer, module) -> None:
        self.start = self.highest = self.process.memory_info().rss

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.highest = max(self.highest, self.process.memory_info().rss)

    def on_train_end(self, trainer, module) -> None:
        peak = high_water_mark()
        report = {"peak": peak, "before_run": self.before_run, "grown_while_training": self.highest - self.start}
        Path(self.out).write_text(json.dumps(report))


def high_water_mark() -> int:
    """This process's peak resident set since it started its program, in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
