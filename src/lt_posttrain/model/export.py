"""Writing a Hugging Face folder (model or LoRA adapter, + tokenizer) so that a crash never leaves a half-written
one, nor one that mixes files of two exports: the export is written whole into a new folder beside the target,
then switched in (:func:`replace_folder`)."""

import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

from lt_posttrain.errors import UserError, reason_of
from lt_posttrain.model.lora import fsdp_units_unwrapped, is_peft_model, merged_lora_model

STEP_EXPORT = re.compile(r"^step-\d+$")
"""The sub-folders of an export folder that hold step exports (``checkpoint.save_every_n_steps``)."""

WRITE_ERRORS = (OSError, RuntimeError)
"""What writing raises: the operating system's errors, and torch's and safetensors' wrappers of them (safetensors'
``SafetensorError`` is added below when it can be imported)."""
try:
    from safetensors import SafetensorError

    WRITE_ERRORS = (*WRITE_ERRORS, SafetensorError)
except ImportError:  # an older safetensors: its errors are OSErrors
    pass


def export_hf(
    model,
    tokenizer,
    output_dir: str | os.PathLike,
    merge_lora: bool = False,
    trust_remote_code: bool = False,
    state_dict: Optional[dict] = None,
    max_shard_size: Union[int, str] = "5GB",
) -> Path:
    """``save_pretrained`` of ``model`` and ``tokenizer`` into ``output_dir``, loadable with ``from_pretrained``.

    A LoRA model (PEFT) is written as its adapter (``PeftModel.from_pretrained(base, output_dir)`` loads it) or, with
    ``merge_lora``, as a plain model: the base reloaded from its source on the CPU with the adapter merged in
    (``trust_remote_code`` for that reload); ``model`` itself is not changed. Everything is written into a new hidden
    folder beside ``output_dir``, flushed to disk, and switched in as a whole (:func:`replace_folder`): whoever reads
    ``output_dir``, during the export or after a crash at any point of it, finds the earlier export or the new one,
    never a mix. Step exports in ``output_dir`` (``step-N`` sub-folders) are kept.

    ``state_dict`` (keyed as ``model.state_dict()``) gives the weights to write when ``model``'s own are not whole,
    e.g. gathered from the shards of DeepSpeed ZeRO-3 or FSDP (:func:`lt_posttrain.training.sharding.gather_state_dict`);
    ``model`` then provides only the config and, for an adapter, which weights belong to it. A model's weights are
    split into safetensors files of at most ``max_shard_size`` (``"5GB"``, or bytes) with an index file.

    Raises:
        UserError: the export cannot be written (a full disk, a folder that cannot be written); ``output_dir`` then
            holds what it held before.
    """
    if merge_lora and is_peft_model(model):
        model, state_dict = merged_lora_model(model, trust_remote_code, state_dict), None
    # A link to a folder elsewhere (another disk) stays a link: the folder it leads to is the one switched.
    target = Path(os.path.realpath(output_dir)) if os.path.islink(output_dir) else Path(output_dir)
    if os.path.lexists(target) and not target.is_dir():
        raise UserError(f"checkpoint.output_dir {str(output_dir)!r}: exists and is not a folder; choose another folder")
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_folder(target)  # what a crashed export left: finish or undo its switch
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        if is_peft_model(model):  # an adapter: small, one file
            with fsdp_units_unwrapped(model):
                model.save_pretrained(staging, state_dict=state_dict)
        else:
            model.save_pretrained(staging, state_dict=state_dict, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        give_default_modes(staging)  # the folder too: mkdtemp makes it 0700
        replace_folder(staging, target, keep=lambda child: child.is_dir() and STEP_EXPORT.match(child.name))
    except WRITE_ERRORS as error:
        if staging is not None:
            _recover_quietly(target)  # a switch that failed half-way: the earlier folder back, or the new one kept
        raise UserError(
            f"checkpoint.output_dir {str(target)!r}: cannot write the export ({reason_of(error)}); {target.name} "
            "holds what it held before"
        ) from error
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# -- switching a folder in ---------------------------------------------------------------------------------------
# The states of a switch, by the name of the folder beside the target: ``.NAME.partial-ID`` is being written (never
# complete: removed), ``.NAME.next-ID`` is complete and waits to be switched in, ``.NAME.previous-ID`` is the target
# that was switched out (its kept sub-folders are moved into the new target, then it is removed).
_PARTIAL, _NEXT, _PREVIOUS = "partial", "next", "previous"


def replace_folder(staging: Path, target: Path, keep: Callable[[Path], bool] = lambda child: False) -> None:
    """Make the complete folder ``staging`` (a sibling of ``target``, named ``.NAME.partial-ID``) the folder
    ``target``, as one switch: the two are exchanged atomically where the file system can (Linux's ``renameat2``),
    else renamed one after the other (a crash between the two leaves no ``target``, which :func:`recover_folder`
    puts back). The sub-folders of the old ``target`` for which ``keep`` is true are moved into the new one; then the
    old one is removed.

    Every file of ``staging`` is flushed to disk before the switch, so a power cut cannot switch in empty files."""
    _sync_tree(staging)
    name, ident = target.name, staging.name.rpartition("-")[2]
    ready = target.with_name(f".{name}.{_NEXT}-{ident}")
    os.rename(staging, ready)
    if not os.path.lexists(target):
        os.rename(ready, target)
        sync_folder(target.parent)
        return
    if not target.is_dir() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists and is not a folder", str(target))
    previous = target.with_name(f".{name}.{_PREVIOUS}-{ident}")
    if _exchange(ready, target):  # ``ready`` now holds the old target
        os.rename(ready, previous)
    else:
        os.rename(target, previous)
        os.rename(ready, target)
    sync_folder(target.parent)
    _retire(previous, target, keep)


def recover_folder(target: Path, keep: Callable[[Path], bool] = lambda child: STEP_EXPORT.match(child.name)) -> None:
    """Finish or undo what a switch into ``target`` (:func:`replace_folder`) left when its process died: a missing
    ``target`` is put back (the complete new folder if there is one, else the old one), half-written folders are
    removed, and the kept sub-folders of an old one are moved into ``target`` before it is removed. Nothing else
    beside ``target`` is touched."""
    parent = target.parent
    if not parent.is_dir():
        return
    left = {state: [] for state in (_PARTIAL, _NEXT, _PREVIOUS)}
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.({_PARTIAL}|{_NEXT}|{_PREVIOUS})-[^/]+$")
    for child in parent.iterdir():
        match = pattern.match(child.name)
        if match and child.is_dir() and not child.is_symlink():
            left[match.group(1)].append(child)
    for partial in left[_PARTIAL]:
        shutil.rmtree(partial, ignore_errors=True)
    if not os.path.lexists(target):
        # A crash between the two renames of a switch: the new folder if it was complete, else the old one.
        candidates = sorted(left[_NEXT], key=_mtime) or sorted(left[_PREVIOUS], key=_mtime)
        if candidates:
            os.rename(candidates[-1], target)
            left[_NEXT if left[_NEXT] else _PREVIOUS].remove(candidates[-1])
            sync_folder(parent)
    # With ``target`` in place, a ``next`` folder either never got switched in (its run died first) or is the old
    # target that an exchange moved there: keep what is kept of it, then remove it, as an old one.
    for old in left[_NEXT] + left[_PREVIOUS]:
        _retire(old, target, keep)


def recover_export(target: Path) -> list[str]:
    """:func:`recover_folder` for export folder ``target`` and for each of its step exports (``step-N``) that a
    killed export left a switch of; returns the names of the folders that were left and are gone now."""
    target = Path(os.path.realpath(target)) if os.path.islink(target) else Path(target)
    left = re.compile(rf"^\.(.+)\.({_PARTIAL}|{_NEXT}|{_PREVIOUS})-[^/]+$")

    def leftovers(parent: Path, name: Optional[str] = None) -> set[str]:
        found = set()
        for child in parent.iterdir() if parent.is_dir() else ():
            match = left.match(child.name)
            if match and (match.group(1) == name if name else STEP_EXPORT.match(match.group(1))):
                found.add(str(child.relative_to(target.parent)))
        return found

    before = leftovers(target.parent, target.name) | leftovers(target)
    steps = {match.group(1) for name in leftovers(target) if (match := left.match(Path(name).name))}
    recover_folder(target)
    for step in sorted(steps):
        recover_folder(target / step, keep=lambda child: False)
    return sorted(name for name in before if not os.path.lexists(target.parent / name))


def _recover_quietly(target: Path) -> None:
    try:
        recover_folder(target)
    except OSError:  # the disk that failed the export may fail this too; the next export tries again
        pass


def _retire(old: Path, target: Path, keep: Callable[[Path], bool]) -> None:
    """Move the kept sub-folders of ``old`` into ``target`` (one rename each: none is ever missing from both), then
    remove ``old``."""
    if target.is_dir():
        for child in sorted(old.iterdir()):
            if keep(child) and not os.path.lexists(target / child.name):
                os.rename(child, target / child.name)
    shutil.rmtree(old, ignore_errors=True)
    sync_folder(target.parent)


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _exchange(first: Path, second: Path) -> bool:
    """Swap the two folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library older than glibc 2.28
        return False
    at_current_folder, rename_exchange = -100, 2
    if renameat2(at_current_folder, os.fsencode(first), at_current_folder, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # a file system without it
        return False
    raise OSError(code, os.strerror(code), str(second))


def _sync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, and the folders themselves, to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        sync_folder(Path(root))


def sync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable (best effort: some file systems cannot open a folder)."""
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
def give_default_modes(folder: str | os.PathLike) -> None:
    """Give ``folder``, its files and sub-folders the mode a plain ``open`` (``mkdir``) gives under the process
    umask, usually 0644 (0755). safetensors 0.8 writes each file through a temporary file created 0600 and renamed
    into place (safetensors issue 782), and ``tempfile.mkdtemp`` makes a folder 0700: an exported model would be
    readable by its owner alone."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def submodule_state_dict(state_dict: dict, name: str) -> dict:
    """The entries of ``state_dict`` under the submodule ``name``, with ``name.`` taken off their keys: a
    LightningModule's state dict (``model.lm_head.weight``) becomes its Hugging Face model's (``lm_head.weight``).
    Entries of other submodules are left out."""
    prefix = f"{name}."
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
