"""A callback for memory tests: how much a run adds to the process's resident memory, and while training."""

import json
import resource
from pathlib import Path

import lightning as L
import psutil


class PeakMemory(L.Callback):
    """Writes ``{"peak", "before_run", "grown_while_training"}`` (bytes) to ``out`` when training ends: the process's
    peak resident set (``ru_maxrss``), its resident set when the callback was built (libraries imported; no model, no
    data yet), and the largest resident set seen after a training batch less the one at the start of training.

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
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
        report = {"peak": peak, "before_run": self.before_run, "grown_while_training": self.highest - self.start}
        Path(self.out).write_text(json.dumps(report))
