"""``AtomicCheckpointIO``: Lightning checkpoints written whole or not at all, and read as tensors and plain values."""

import os
import pickle
import re
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lt_posttrain.errors import UserError


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
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
            _sync_folder(target.parent)
        except (OSError, RuntimeError) as error:  # torch reports a failed write as a RuntimeError
            raise UserError(
                f"cannot write checkpoint {target} ({_reason(error)}); the checkpoints written before it are intact"
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
        if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
            raise UserError(
                f"checkpoint {path}: not a training checkpoint (a .ckpt file from training_state); to start from a "
                "model's weights, set model.name_or_path instead"
            )
        return checkpoint


CHECKPOINT_READ_ERRORS = (pickle.UnpicklingError, OSError, RuntimeError, EOFError)
"""What ``torch.load`` raises for a file it refuses or cannot read."""


def checkpoint_read_error(path, error: BaseException) -> UserError:
    """The one line for ``error`` (one of :data:`CHECKPOINT_READ_ERRORS`) raised while reading checkpoint ``path``."""
    if isinstance(error, pickle.UnpicklingError):
        return UserError(
            f"checkpoint {path}: holds objects other than tensors and plain values ({_reason(error)}); if you trust "
            "the file, add --weights_only false"
        )
    return UserError(f"checkpoint {path}: cannot be read, truncated or not a checkpoint ({_reason(error)})")


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: some file systems cannot open a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _reason(error: BaseException) -> str:
    """The first useful line of ``error``: the operating system's reason where there is one (torch wraps a failed
    write in a ``RuntimeError``), the refused class of a weights-only load."""
    cause = error.__context__ if isinstance(error.__context__, OSError) else error
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = str(error).strip()
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"{refused.group(1)} is not allowed"
    return text.splitlines()[0].split(". ")[0][:200] if text else type(error).__name__
