"""``TrainingStateCheckpoint``: full checkpoints to resume from (``--ckpt_path last``), every N steps and at the end."""

import os
import re
import shutil
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lt_posttrain.errors import UserError
from lt_posttrain.training.checkpoint_io import CHECKPOINT_READ_ERRORS, PARTIAL, AtomicCheckpointIO, partial_path
from lt_posttrain.training.run_folder import WRITE_TEST, check_writable, process_is_running

_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")
_DEEPSPEED_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class TrainingStateCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, set up to resume: each checkpoint holds the weights, optimizer, learning-rate
    schedule, random states and the position in the epoch's data, so ``lt-posttrain fit ... --ckpt_path last``
    continues at the next batch as if never stopped.

    Files are ``step-N.ckpt`` (the newest ``keep_last`` kept) and ``last.ckpt``, a link to the newest. Each is written
    to a hidden file and renamed into place (:class:`AtomicCheckpointIO`), so a crash or a full disk never leaves a
    half-written one; ``--ckpt_path last`` picks the newest complete checkpoint. Under DeepSpeed (and FSDP's sharded
    state dict) each checkpoint is a folder of that name instead, complete once its last file is written
    (:func:`checkpoint_states_file`). ``trainer.enable_checkpointing false`` turns this off.

    Args:
        dirpath: the folder. Default: ``checkpoints`` under ``trainer.default_root_dir`` (not under a logger's
            version folder, so that the next run finds it).
        every_n_steps: write one every N optimizer steps (0: only at the end of training).
        keep_last: how many ``step-N.ckpt`` files to keep (-1: all; 0: only ``last.ckpt``, then a full copy).
        save_end_of_training: also write one when training ends, whatever the step.
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        every_n_steps: int = 500,
        keep_last: int = 2,
        save_end_of_training: bool = True,
    ):
        if every_n_steps < 0 or keep_last < -1:
            raise UserError(
                f"training_state: every_n_steps must be >= 0 and keep_last >= -1, got {every_n_steps} and {keep_last}"
            )
        super().__init__(
            dirpath=dirpath, filename="step-{step}", monitor="step", mode="max", save_top_k=keep_last,
            every_n_train_steps=every_n_steps, save_last="link" if keep_last else True, auto_insert_metric_name=False,
            save_on_train_epoch_end=True, enable_version_counter=False,
        )  # fmt: skip
        self.save_end_of_training = save_end_of_training

    def resolved_dirpath(self, trainer: L.Trainer) -> str:
        """The folder: ``dirpath``, else ``checkpoints`` under ``trainer.default_root_dir`` (as a real path, as
        ``ModelCheckpoint`` stores a given one, so that a resumed run recognises its own files)."""
        if self.dirpath:
            return str(self.dirpath)
        return default_dirpath(trainer.default_root_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath = self.resolved_dirpath(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default; never replace a chosen one
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit" and trainer.is_global_zero:
            hint = "choose another folder (or trainer.default_root_dir), or set trainer.enable_checkpointing false"
            check_writable(self.dirpath, "training_state.dirpath", hint)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """What ``--ckpt_path last`` resumes from: :func:`newest_checkpoint` in the folder."""
        newest = newest_checkpoint(Path(self.resolved_dirpath(trainer)))
        return {str(newest)} if newest is not None else set()

    def refuse_earlier_checkpoints(self, trainer: L.Trainer) -> None:
        """A run that does not resume may not write its checkpoints among an earlier run's: ``last`` and the kept
        ``step-N`` files would mix the two runs. One line saying what to do instead."""
        folder = Path(self.resolved_dirpath(trainer))
        entries = folder.iterdir() if folder.is_dir() else ()
        found = sorted(path.name for path in entries if _is_checkpoint_name(path.name))
        if found:
            key = "training_state.dirpath" if self.dirpath else "trainer.default_root_dir"
            listed = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise UserError(
                f"{folder} holds the checkpoints of an earlier run ({listed}): to continue that run add --ckpt_path "
                f"last; to start a new one choose another {key} (or remove those checkpoints)"
            )

    def remove_leftovers(self, trainer: L.Trainer) -> list[str]:
        """Remove what a killed run left in the folder: checkpoint files and ``last.ckpt`` links it was writing
        (``*.PID.partial``, of a process that no longer runs) and write probes. Returns their names."""
        folder = Path(self.resolved_dirpath(trainer))
        removed = []
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            match = PARTIAL.match(path.name) or re.match(rf"^{re.escape(WRITE_TEST)}(\d+)$", path.name)
            if match and not process_is_running(int(match.group(1))):
                _remove(str(path))
                removed.append(path.name)
        return removed

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        """Point ``linkpath`` at ``filepath`` with one rename: there is never a moment without a ``last.ckpt`` (but
        where it was a folder, which no rename replaces: a full copy under DeepSpeed, from ``keep_last`` 0)."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            staging = str(partial_path(Path(linkpath)))
            _remove(staging)
            try:
                os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), staging)
            except OSError:  # a file system without links: a copy, as Lightning falls back to
                (shutil.copytree if os.path.isdir(filepath) else shutil.copyfile)(filepath, staging)
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                _remove(linkpath)  # until the rename, ``--ckpt_path last`` finds ``step-N.ckpt``
            os.replace(staging, linkpath)
        trainer.strategy.barrier()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # This step's state is on disk already (the checkpoint resumed from). Without this, a resumed run writes it
        # again after its first micro-batch: in the middle of an accumulation, whose gradients no checkpoint holds.
        self._last_global_step_saved = trainer.global_step
        _start_the_epoch_after_an_epoch_end_checkpoint(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_end_of_training and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def _start_the_epoch_after_an_epoch_end_checkpoint(trainer: L.Trainer) -> None:
    """Resumed from the last batch of an epoch, Lightning 2.6 closes that epoch but keeps its "restarted mid-epoch"
    mark through the next one: that epoch is never counted as started (so a checkpoint taken in it reads, on load, as
    one from before it began) and its ``on_train_epoch_start`` hooks do not run. Clearing the mark lets the next epoch
    start as any other."""
    loop = trainer.fit_loop
    progress = loop.epoch_progress.current
    if loop.restarted_mid_epoch and progress.processed == progress.started:  # mid-epoch would be started - 1
        loop.reset_restart_stage()


def newest_checkpoint(folder: Path) -> Optional[Path]:
    """The complete checkpoint of the highest step in ``folder``, ``step-N.ckpt`` or ``last.ckpt`` (each a file, or a
    folder under DeepSpeed); None if there is none. A run that died after writing ``step-N.ckpt`` but before linking
    ``last.ckpt`` to it resumes from step N, not from the checkpoint before."""
    last = folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    entries = folder.iterdir() if folder.is_dir() else ()
    steps = [(int(match.group(1)), path) for path in entries if (match := _STEP_FILE.match(path.name))]
    complete = sorted((step, path) for step, path in steps if _is_complete(path))
    if _is_complete(last):
        step = _step_of_last(last)
        if not complete or (step is not None and step >= complete[-1][0]):
            return last
    return complete[-1][1] if complete else None


def default_dirpath(default_root_dir: Optional[str]) -> str:
    """Where the checkpoints go without ``training_state.dirpath``: ``checkpoints`` under ``trainer.default_root_dir``
    (the working folder if unset), as a real path."""
    return os.path.realpath(os.path.join(default_root_dir or os.getcwd(), "checkpoints"))


def checkpoint_states_file(folder: Path) -> Optional[Path]:
    """The file of checkpoint folder ``folder`` that holds Lightning's state beside the shards (hyper-parameters,
    loops, callbacks), or None if ``folder`` is not a complete checkpoint folder.

    DeepSpeed writes ``TAG/mp_rank_00_model_states.pt`` (``zero_pp_rank_0_mp_rank_00_model_states.pt`` under ZeRO-3),
    then ``latest`` naming TAG (Lightning's is ``checkpoint``); FSDP's sharded state dict writes ``meta.pt`` last."""
    if (folder / "meta.pt").is_file():
        return folder / "meta.pt"
    try:
        tag = (folder / "latest").read_text().strip()
    except OSError:
        return None
    return next((folder / tag / name for name in _DEEPSPEED_STATES if tag and (folder / tag / name).is_file()), None)


def _step_of_last(last: Path) -> Optional[int]:
    """The step of ``last.ckpt``: from the name it links to, else (a copy) from its contents; None if unreadable."""
    if last.is_symlink():
        match = _STEP_FILE.match(Path(os.readlink(last)).name)
        if match:
            return int(match.group(1))
    states = checkpoint_states_file(last) if last.is_dir() else last
    try:  # mapped, not read: only the step is wanted
        return int(torch.load(states, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except (*CHECKPOINT_READ_ERRORS, KeyError, TypeError, ValueError):  # not resumable either: the step files decide
        return None


def _is_checkpoint_name(name: str) -> bool:
    last = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    return bool(_STEP_FILE.match(name)) or name == last


def _is_complete(checkpoint: Path) -> bool:
    return checkpoint.is_file() or (checkpoint.is_dir() and checkpoint_states_file(checkpoint) is not None)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
