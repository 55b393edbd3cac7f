"""``RandomStateCheckpoint``: every rank's random-number generators saved in checkpoints and restored on resume."""

import random
from typing import Any, Optional

import lightning as L
import numpy as np
import torch

from lt_posttrain.training.strategy import gather_objects

RANDOM_STATES_KEY = "random_states"


class RandomStateCheckpoint(L.Callback):
    """Puts the Python, NumPy, torch and CUDA generator states of every rank into each checkpoint (Lightning saves
    none) and restores them when training resumes, so dropout draws the same masks as in an uninterrupted run.

    They are restored at the start of training, after the data loaders exist: what happens between loading and the
    first batch does not use them. The states are plain tensors and numbers, so ``weights_only`` loading reads them.
    A checkpoint from a run with another number of ranks leaves the generators as seeded.
    """

    def __init__(self):
        self._to_restore: Optional[dict] = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RANDOM_STATES_KEY] = _gather(capture_random_states(), trainer.world_size)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get(RANDOM_STATES_KEY)
        self._to_restore = states[trainer.global_rank] if states and len(states) == trainer.world_size else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is not None:
            restore_random_states(self._to_restore)
            self._to_restore = None


def capture_random_states() -> dict[str, Any]:
    """This process's generator states as tensors, numbers and strings."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    """Set the generators to ``states`` (from :func:`capture_random_states`)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _gather(states: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    """Every rank's ``states``, by rank (the checkpoint is written by one rank only)."""
    return [states] if world_size == 1 else gather_objects(states)
