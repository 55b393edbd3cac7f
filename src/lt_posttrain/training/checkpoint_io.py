"""``AtomicCheckpointIO``: Lightning checkpoints written whole or not at all, and read as tensors and plain values."""

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lt_posttrain.errors import UserError, reason_of
from lt_posttrain.model.export import sync_folder


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes a local checkpoint to a hidden file beside it, flushes it to disk and renames
    it over the target (``os.replace``), so a crash or a full disk leaves the previous file as it was; and that loads
    with ``weights_only=True`` unless told otherwise (``--weights_only false``), so a checkpoint cannot run code.

    Write and read failures are one-line :class:`~lt_posttrain.errors.UserError` s.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        partial = partial_path(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
            sync_folder(target.parent)
        except (OSError, RuntimeError) as error:  # torch reports a failed write as a RuntimeError
            raise UserError(
                f"cannot write checkpoint {target} ({reason_of(error)}); the checkpoints written before it are intact"
            ) from error
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        weights_only = True if weights_only is None else weights_only
        if _is_local_file_protocol(path) and not Path(path).is_file():
            raise UserError(f"--ckpt_path {str(path)!r}: no such checkpoint file")
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except CHECKPOINT_READ_ERRORS as error:
            raise checkpoint_read_error(path, error) from error
        return check_training_checkpoint(checkpoint, path)


def read_checkpoint(path: str | os.PathLike, resume: bool = True, in_folder: bool = False) -> dict:
    """The training checkpoint file ``path`` (a checkpoint folder's states file, ``in_folder``), read weights-only and
    mapped: its tensors are not read into memory until used. Raises what ``torch.load`` raises
    (:data:`CHECKPOINT_READ_ERRORS`), or a one-line error for a file that is no (complete) training checkpoint;
    ``resume``: one to continue training from, with optimizer and loop states."""
    if not _is_torch_archive(path):  # a mapped load of anything else fails less clearly
        raise UserError(f"checkpoint {path}: cannot be read, truncated or not a checkpoint (not a file torch.save "
                        "writes)")  # fmt: skip
    checkpoint = check_training_checkpoint(torch.load(path, map_location="cpu", weights_only=True, mmap=True), path)
    required = ["global_step", *(["loops"] if resume else [])]
    if not in_folder:  # a DeepSpeed folder keeps the weights and optimizer states in files of their own
        required += ["state_dict", *(["optimizer_states", "lr_schedulers"] if resume else [])]
    missing = [key for key in required if key not in checkpoint]
    if resume and not missing and "fit_loop" not in (checkpoint["loops"] or {}):
        missing = ["loops.fit_loop"]
    wrong = not isinstance(checkpoint.get("global_step", 0), int)
    wrong = wrong or not isinstance(checkpoint.get("state_dict", {}), dict)
    if missing or wrong:
        what = f"no {missing[0]!r}" if missing else "its global_step or state_dict is of the wrong kind"
        raise UserError(f"checkpoint {path}: not a complete training checkpoint ({what}); give a step-N.ckpt file from "
                        "training_state (to start from a model's weights, set model.name_or_path instead)")  # fmt: skip
    return checkpoint


def check_training_checkpoint(checkpoint: Any, path) -> dict:
    """``checkpoint`` if it is a Lightning checkpoint, else the one line saying what to do instead."""
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        raise UserError(
            f"checkpoint {path}: not a training checkpoint (a .ckpt file from training_state); to start from a "
            "model's weights, set model.name_or_path instead"
        )
    return checkpoint


def weights_mismatch(error: RuntimeError) -> Optional[str]:
    """What ``load_state_dict``'s ``error`` says is wrong with a checkpoint's weights (missing, unexpected or
    mismatched tensors), in one line; None for another error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines or not lines[0].startswith("Error(s) in loading state_dict"):
        return None
    detail = lines[1] if len(lines) > 1 else lines[0]
    return detail if len(detail) <= 200 else detail[:197] + "..."


PARTIAL = re.compile(r"^\.?.+\.(\d+)\.partial$")
"""The name of a checkpoint file (``.step-4.ckpt.PID.partial``) or link (``last.ckpt.PID.partial``) being written by
process PID: never complete, and removed by that process when it ends, or at the next start if it was killed."""


def partial_path(target: Path) -> Path:
    """Where this process writes ``target`` before renaming it into place."""
    return target.with_name(f".{target.name}.{os.getpid()}.partial")


CHECKPOINT_READ_ERRORS = (Exception,)
"""What ``torch.load`` raises for a file it refuses or cannot read: bytes that are no checkpoint go through its zip
reader or its unpickler, which fail in a dozen ways (``UnpicklingError``, ``EOFError``, ``IndexError``,
``UnicodeDecodeError``, ``struct.error``, ...)."""


def checkpoint_read_error(path, error: BaseException) -> UserError:
    """The one line for ``error`` (one of :data:`CHECKPOINT_READ_ERRORS`) raised while reading checkpoint ``path``."""
    if isinstance(error, UserError):
        return error
    if refused_by_weights_only(error, path):
        return UserError(
            f"checkpoint {path}: holds objects other than tensors and plain values ({reason_of(error)}); if you trust "
            "the file, add --weights_only false"
        )
    # The reason of an unpickler that met bytes no checkpoint holds ("pop from empty list") would only confuse.
    reason = f" ({reason_of(error)})" if isinstance(error, (OSError, RuntimeError)) else ""
    return UserError(f"checkpoint {path}: cannot be read, truncated or not a checkpoint{reason}")


def refused_by_weights_only(error: BaseException, path) -> bool:
    """Whether ``torch.load`` refused a readable checkpoint ``path`` for the classes it names (which ``--weights_only
    false`` would load), rather than failing on bytes that are no checkpoint at all (which it may report as the same
    error: random bytes can read as a pickle naming a class). A checkpoint is a zip archive (``torch.save``'s)."""
    unsupported = isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error)
    return unsupported and _is_zip(path)


def _is_zip(path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _is_torch_archive(path) -> bool:
    """A zip archive with the pickle ``torch.save`` writes (``NAME/data.pkl``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
