"""A callback for tests of sequence parallelism: the first step's gradients (as :class:`GradCapture` saves them) and,
per rank, where each training micro-batch's part of its packed row lies and the sample boundaries of the whole row."""

import json
from pathlib import Path

from grad_capture import GradCapture


class ShardAudit(GradCapture):
    """:class:`GradCapture` that also writes ``out/rank-N.json``: ``[{"tokens": part length, "bounds": [...]}]``, one
    entry per training micro-batch of this rank (``bounds``: the whole row's ``cu_seq_lens_q``).

    Args:
        path: where rank 0 saves the first step's gradients.
        out: folder of the per-rank reports.
    """

    def __init__(self, path: str, out: str):
        super().__init__(path)
        self.out = Path(out)
        self.parts: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.parts.append({"tokens": batch["input_ids"].shape[-1], "bounds": batch["cu_seq_lens_q"].tolist()})

    def on_train_end(self, trainer, module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(self.parts))
