"""Folders a run writes to, checked before the run spends time, so that a bad path is one line at the start."""

import os
from pathlib import Path

from lt_posttrain.errors import UserError


def check_writable(folder: str | os.PathLike, key: str, hint: str = "choose another folder") -> Path:
    """Create ``folder`` if missing and write (and remove) a file in it.

    Args:
        folder: the folder.
        key: the recipe key that names it, for the message.
        hint: what the user can do instead.

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        UserError: it cannot be created or written.
    """
    folder = Path(folder)
    probe = folder / f".write-test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"{key} {str(folder)!r}: cannot write there ({error.strerror or error}); {hint}") from error
    return folder
