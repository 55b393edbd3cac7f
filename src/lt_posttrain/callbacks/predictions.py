"""``PredictionWriter``: what ``lt-posttrain predict`` generates, one JSON line per conversation."""

import json
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """Write ``{"prompt", "reference", "generated"}`` lines to a JSONL file.

    Args:
        output_path: the file; default ``predictions.jsonl`` in the run directory (``.rankN`` added per rank when
            several processes predict).
    """

    def __init__(self, output_path: Optional[str] = None):
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self._file = None

    def _path(self, trainer) -> Path:
        path = Path(self.output_path) if self.output_path else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        return path.with_name(f"{path.name}.rank{trainer.global_rank}") if trainer.world_size > 1 else path

    def on_predict_epoch_start(self, trainer, module) -> None:
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w")

    def write_on_batch_end(self, trainer, module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        for record in prediction:
            self._file.write(json.dumps(record) + "\n")

    def on_predict_epoch_end(self, trainer, module) -> None:
        self._file.close()
        rank_zero_info(f"predictions written to {self._path(trainer).resolve()}")
