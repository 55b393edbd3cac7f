"""The folder a run writes to: checked before the run spends time, so that a bad path is one line at the start, and
owned by one run at a time (:class:`RunFolder`)."""

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterable, Optional

from lt_posttrain.errors import UserError

try:
    import fcntl
except ImportError:  # not a POSIX system: the lock falls back to the process id it names
    fcntl = None

LOCK_FILE = ".lt-posttrain.lock"
"""The lock file in ``trainer.default_root_dir`` while a ``fit`` runs there."""

WRITE_TEST = ".write-test."
"""The prefix of :func:`check_writable`'s probe files (one a process id)."""


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
    probe = folder / f"{WRITE_TEST}{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"{key} {str(folder)!r}: cannot write there ({error.strerror or error}); {hint}") from error
    return folder


class RunFolder:
    """``trainer.default_root_dir`` owned by one ``fit`` while it runs, and left as it was by a run that fails before
    its first training step.

    :meth:`claim` takes the folder's lock file (:data:`LOCK_FILE`, naming this process: its id, host, start time and
    command) with an exclusive ``flock``, which the system drops when the process ends however it ends: a second run
    in the folder is refused in one line naming the first, and a lock file whose process is gone (killed) is taken
    over with a one-line note. Where the file system has no locks, a lock file naming a live process of this host, or
    any process of another host, is respected. :meth:`release` removes the lock; with ``failed_before_training`` it
    also removes what the run created (the folders of ``created`` that did not exist at :meth:`claim`, its own log
    folder with what the loggers wrote in it), so that a run refused for its recipe or data leaves nothing behind.

    Args:
        root: the folder (``trainer.default_root_dir``).
        command: the command line, for the message another run gets.
        created: the folders this run may create before training (checkpoints, export, log folder), to remove if they
            are still empty after a failure; ``own``: folders that belong to this run alone (its log version folder),
            removed with their content.
    """

    def __init__(self, root: str | os.PathLike, command: str, created: Iterable = (), own: Iterable = ()):
        self.root = Path(root)
        self.lock = self.root / LOCK_FILE
        self.command = command
        self._descriptor: Optional[int] = None
        self._own = [Path(path) for path in own]
        # the folders and each of their parents up to the root, deepest first, and whether each existed
        paths = {self.root}
        for path in [*map(Path, created), *self._own]:
            paths.update(parent for parent in [path, *path.parents] if _inside(parent, self.root))
        self._existed = {path: os.path.lexists(path) for path in sorted(paths, key=lambda p: -len(p.parts))}
        self._made_above = []  # the folders above the root that claiming it makes, deepest first
        for parent in self.root.absolute().parents:
            if os.path.lexists(parent):
                break
            self._made_above.append(parent)

    # -- the lock --------------------------------------------------------------------------------------------------
    def claim(self) -> Optional[str]:
        """Take the folder for this process.

        Returns:
            a one-line note when a lock left by a process that no longer runs was taken over, else None.

        Raises:
            UserError: another run holds the folder, or the folder cannot be written.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            descriptor, locked = self._lock_descriptor()
        except OSError as error:
            raise UserError(f"trainer.default_root_dir {str(self.root)!r}: cannot write there "
                            f"({error.strerror or error}); choose another folder") from error  # fmt: skip
        holder = _read_holder(descriptor)
        if holder and not locked and _may_be_running(holder):
            os.close(descriptor)
            raise self._in_use(holder, known_alive=holder.get("host") == socket.gethostname())
        note = None
        if holder:
            note = (f"trainer.default_root_dir {str(self.root)!r}: {_describe(holder)} no longer runs (killed?); "
                    "its lock is taken over")  # fmt: skip
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": self.command}  # fmt: skip
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, data, 0)
        os.fsync(descriptor)
        self._descriptor = descriptor
        return note

    def _lock_descriptor(self) -> tuple[int, bool]:
        """An open descriptor of the lock file and whether it holds the ``flock`` (False: no locks here). Raises the
        one-line error if another process holds it."""
        while True:
            descriptor = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                return descriptor, False
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(descriptor)
                os.close(descriptor)
                raise self._in_use(holder, known_alive=True) from None
            except OSError:  # a file system without locks
                return descriptor, False
            try:  # the file locked is still the one of that name (not removed by its holder as it ended)
                if os.fstat(descriptor).st_ino == os.stat(self.lock).st_ino:
                    return descriptor, True
            except FileNotFoundError:
                pass
            os.close(descriptor)

    def _in_use(self, holder: dict, known_alive: bool) -> UserError:
        what = _describe(holder) if holder else "another process (its lock file names none yet)"
        advice = "wait for it to end or choose another trainer.default_root_dir"
        if not known_alive:
            advice += f" (if it no longer runs, remove {self.lock})"
        return UserError(f"trainer.default_root_dir {str(self.root)!r} is in use by another run: {what}; {advice}")

    def release(self, failed_before_training: bool = False) -> None:
        """Give the folder up (remove the lock file); with ``failed_before_training``, remove what the run created."""
        if self._descriptor is None:
            return
        try:
            if failed_before_training:
                self._remove_created()
            if os.fstat(self._descriptor).st_ino == os.stat(self.lock).st_ino:
                os.unlink(self.lock)
        except OSError:  # the folder went away, or its disk failed: nothing more to do
            pass
        finally:
            os.close(self._descriptor)
            self._descriptor = None
        if failed_before_training and not self._existed[self.root]:
            for folder in [self.root, *self._made_above]:
                _remove_if_empty(folder)

    def _remove_created(self) -> None:
        for path in self._own:
            if not self._existed[path] and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
        for path, existed in self._existed.items():  # deepest first
            if not existed and path != self.root:
                _remove_if_empty(path)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty, not a folder, or gone
        pass


def _read_holder(descriptor: int) -> dict:
    try:
        text = os.pread(descriptor, 4096, 0).decode(errors="replace").strip()
        holder = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"pid": "?"}  # a lock file of unknown content: someone's
    return holder if isinstance(holder, dict) else {"pid": "?"}


def _describe(holder: dict) -> str:
    parts = [f"process {holder.get('pid', '?')}"]
    if holder.get("host"):
        parts.append(f"on {holder['host']}")
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    command = f" ({holder['command']})" if holder.get("command") else ""
    return " ".join(parts) + command


def _may_be_running(holder: dict) -> bool:
    """Without ``flock``: whether the process a lock file names may still run (another host's: it may)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        return process_is_running(int(holder.get("pid")))
    except (TypeError, ValueError):
        return True


def process_is_running(pid: int) -> bool:
    """Whether another process ``pid`` runs on this host (this process's own id: False, its files are its own)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):
        return False
    return True
