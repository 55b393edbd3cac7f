"""A callback for tests: what each rank of a run wrote under a folder, and the samples it trained on."""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_CHANGES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.truncate", "shutil.rmtree"}


class RankAudit(L.Callback):
    """Records the paths this process creates, writes, renames or removes under ``watch`` (through Python's audit
    hooks, from the moment the callback is built) and the tokens of each sample of each training micro-batch; at the
    end each rank writes them to ``out/rank-N.json`` as ``{"writes": [path, ...], "steps": [[sample, ...], ...]}``,
    one list of samples per micro-batch (padded or packed), each sample its token ids without padding.

    Args:
        watch: the folder whose changes are recorded.
        out: where the reports go (outside ``watch``).
    """

    def __init__(self, watch: str, out: str):
        self.watch, self.out = os.path.realpath(watch) + os.sep, out
        self.writes: list[str] = []
        self.steps: list[list[list[int]]] = []
        sys.addaudithook(self._audit)

    def _audit(self, event: str, args: tuple) -> None:
        if event == "open":
            paths = args[:1] if isinstance(args[2], int) and args[2] & _WRITE_FLAGS else ()
        elif event in _CHANGES:
            paths = args[:2]
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):  # not a file descriptor
                path = os.path.realpath(os.fsdecode(path))
                if path.startswith(self.watch):
                    self.writes.append(path)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        ids = batch["input_ids"]
        if "cu_seq_lens_q" in batch:  # a packed row: a sample between each pair of boundaries
            row, bounds = ids[0].tolist(), batch["cu_seq_lens_q"].tolist()
            self.steps.append([row[start:end] for start, end in zip(bounds, bounds[1:])])
            return
        mask = batch.get("attention_mask", torch.ones_like(ids))  # packed rows: no padding to take off
        self.steps.append([row[keep.bool()].tolist() for row, keep in zip(ids, mask)])

    def teardown(self, trainer, module, stage) -> None:
        report = {"writes": sorted(set(self.writes)), "steps": self.steps}
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / f"rank-{trainer.global_rank}.json").write_text(json.dumps(report))
