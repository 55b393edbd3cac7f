"""Stage 1: a data source (hub id, local file or folder) becomes a table of rows."""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from lt_posttrain.errors import UserError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class Source:
    """One data source of a recipe.

    Args:
        name_or_path: a hub dataset id (``HuggingFaceH4/ultrachat_200k``), a local ``.json``/``.jsonl``/``.parquet``
            /``.arrow``/``.csv`` file, or a folder of such files.
        split: the split to read (hub datasets; local files have one split, ``train``).
        sample_count: keep only the first N rows (after shuffling, if ``shuffle``).
        shuffle: shuffle the rows (with ``seed``) before ``sample_count`` is applied.
        seed: seed of that shuffle.
    """

    name_or_path: str
    split: str = "train"
    sample_count: Optional[int] = None
    shuffle: bool = False
    seed: int = 0


def as_source(entry: Union[str, Source, dict]) -> Source:
    if isinstance(entry, Source):
        return entry
    if isinstance(entry, dict):
        return Source(**entry)
    return Source(name_or_path=str(entry))


def _local_format(path: Path) -> tuple[str, list[str]]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS and not p.name.startswith("."))
        kinds = {LOCAL_FORMATS[p.suffix] for p in files}
        if len(kinds) != 1:
            found = ", ".join(sorted(kinds)) or "none"
            raise UserError(f"data source {str(path)!r}: a folder must hold files of one format (found: {found})")
        return kinds.pop(), [str(p) for p in files]
    if path.suffix not in LOCAL_FORMATS:
        raise UserError(f"data source {str(path)!r}: unknown file type (use one of {', '.join(LOCAL_FORMATS)})")
    return LOCAL_FORMATS[path.suffix], [str(path)]


def load_rows(source: Source):
    """The rows of ``source`` as a ``datasets.Dataset``."""
    import datasets

    path = Path(source.name_or_path).expanduser()
    if path.exists():
        builder, files = _local_format(path)
        try:
            rows = datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as error:  # malformed JSON and friends: name the file, not the parser internals
            raise UserError(f"data source {str(path)!r}: cannot read it ({_first_line(error)})") from error
    elif path.suffix in LOCAL_FORMATS or os.sep in source.name_or_path and not _HUB_ID.match(source.name_or_path):
        raise UserError(f"data source {source.name_or_path!r}: no such file or folder")
    else:
        try:
            rows = datasets.load_dataset(source.name_or_path, split=source.split)
        except Exception as error:
            raise UserError(
                f"data source {source.name_or_path!r} (split {source.split!r}): not a local path and cannot be "
                f"loaded from the hub ({_first_line(error)})"
            ) from error
    if source.shuffle:
        rows = rows.shuffle(seed=source.seed)
    if source.sample_count is not None:
        rows = rows.select(range(min(source.sample_count, len(rows))))
    return rows


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
