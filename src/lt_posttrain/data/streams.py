"""Stage 1 for a streamed source (``streaming: true``): its rows read as they come, each data-parallel rank its own
part, from a position that a checkpoint holds.

A row stream yields ``(index, row)`` from its position to the end of this rank's part of the current pass
(``epoch``); ``next_epoch()`` rewinds it for the next pass; ``state_dict()`` is the position after the last row
yielded, and ``load_state_dict()`` continues from there.

- Local JSON Lines files (:class:`JsonLinesStream`): the files are split among the ranks by bytes (each rank reads the
  lines that start in its share, and nothing else), and the position is a byte offset: a resumed run seeks there and
  reads no row before it. Start-up reads no data at all.
- Hub data sets and other local formats (:class:`DatasetsStream`): ``datasets``' ``IterableDataset``, split with
  ``datasets.distributed.split_dataset_by_node`` (whole shards per rank when their number divides by the ranks, else
  every rank reads all and keeps one row in ``world_size``), the position its ``state_dict``. On resume ``datasets``
  reads the current shard (file) again up to the position, skipping those rows (they are not tokenized again).
"""

import json
import os
from pathlib import Path
from typing import Iterator, Optional

from lt_posttrain.data.sources import LOCAL_FORMATS, Source, _first_line, _HUB_ID, _local_format
from lt_posttrain.errors import UserError


def open_stream(source: Source, rank: int = 0, world_size: int = 1):
    """The row stream of ``source`` for ``rank`` of ``world_size`` data-parallel ranks: a
    :class:`JsonLinesStream` for local JSON Lines files, else a :class:`DatasetsStream`.

    Raises:
        UserError: no such file, an empty file, a hub data set that cannot be opened, or ``shuffle`` (a stream is
            read in order: shuffle its files beforehand).
    """
    check_streamable(source)
    path = Path(source.name_or_path).expanduser()
    if path.exists():
        builder, files = _local_format(path)
        empty = [file for file in files if os.path.getsize(file) == 0]
        if empty:
            raise UserError(f"data source {str(path)!r}: {empty[0]} is empty (give a file with rows)")
        if builder == "json" and all(_is_json_lines(file) for file in files):
            return JsonLinesStream(source.name_or_path, files, rank, world_size)
        return DatasetsStream(source, rank, world_size, builder, files)
    if path.suffix in LOCAL_FORMATS or os.sep in source.name_or_path and not _HUB_ID.match(source.name_or_path):
        raise UserError(f"data source {source.name_or_path!r}: no such file or folder")
    return DatasetsStream(source, rank, world_size)


def check_streamable(source: Source) -> None:
    """Refuse what a stream cannot do, in one line: ``shuffle`` (it needs the whole table; a stream is read in
    order)."""
    if source.shuffle:
        raise UserError(f"data source {source.name_or_path!r}: shuffle needs the whole table, and a streamed source "
                        "is read in order; remove shuffle (or streaming), or shuffle the files beforehand")  # fmt: skip


def _is_json_lines(file: str) -> bool:
    """Whether ``file`` holds one JSON object per line: a ``.jsonl`` file, or a ``.json`` file that starts with an
    object (not one JSON document such as a list of rows)."""
    if file.endswith(".jsonl"):
        return True
    with open(file, "rb") as handle:
        start = handle.read(4096).lstrip()
    return start.startswith(b"{")


class JsonLinesStream:
    """The rows of local JSON Lines files, this rank's share of their bytes, read line by line.

    The files are taken as one sequence of bytes, cut into ``world_size`` equal shares; a line belongs to the rank
    whose share holds its first byte. The position is ``(part, offset)``: the file part of this rank's share being
    read and the byte offset of its next line.

    Args:
        name: the source's ``name_or_path``, for error messages.
        files: the files, in order.
        rank, world_size: this data-parallel rank and the number of ranks.
    """

    def __init__(self, name: str, files: list[str], rank: int = 0, world_size: int = 1):
        self.name = name
        sizes = [os.path.getsize(file) for file in files]
        total = sum(sizes)
        start, end = rank * total // world_size, (rank + 1) * total // world_size
        self.parts: list[tuple[str, int, int]] = []  # (file, first byte, end byte) of this rank's share, per file
        base = 0
        for file, size in zip(files, sizes):
            low, high = max(start, base) - base, min(end, base + size) - base
            if low < high:
                self.parts.append((file, low, high))
            base += size
        self.epoch, self.part, self.offset, self.read = 0, 0, None, 0  # offset None: the part's first line

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        while self.part < len(self.parts):
            file, low, high = self.parts[self.part]
            with open(file, "rb") as handle:
                if self.offset is None:
                    self.offset = _first_line_start(handle, low)
                handle.seek(self.offset)
                while self.offset < high:
                    line = handle.readline()
                    if not line:
                        break
                    at, self.offset = self.offset, self.offset + len(line)
                    if line.strip():
                        row = self._parse(line, file, at)
                        self.read += 1
                        yield self.read - 1, row
            self.part, self.offset = self.part + 1, None

    def _parse(self, line: bytes, file: str, at: int) -> dict:
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
            raise UserError(f"data source {self.name!r}: {file}, the line at byte {at}: malformed JSON ({reason}); "
                            "fix or remove that line") from error  # fmt: skip
        if not isinstance(row, dict):
            raise UserError(f"data source {self.name!r}: {file}, the line at byte {at}: not a JSON object (a row is "
                            "one object per line)")  # fmt: skip
        return row

    def next_epoch(self) -> None:
        """Rewind to the start of this rank's share, for the next pass."""
        self.epoch, self.part, self.offset, self.read = self.epoch + 1, 0, None, 0

    def state_dict(self) -> dict:
        """The position after the last row yielded: ``epoch``, ``part``, ``offset`` (bytes), ``read`` (rows)."""
        return {"epoch": self.epoch, "part": self.part, "offset": self.offset, "read": self.read}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the row where ``state`` (from :meth:`state_dict`) was taken."""
        self.epoch, self.part, self.offset, self.read = state["epoch"], state["part"], state["offset"], state["read"]


def _first_line_start(handle, low: int) -> int:
    """The offset of the first line that starts at or after byte ``low`` of the open file ``handle``."""
    if low == 0:
        return 0
    handle.seek(low - 1)
    if handle.read(1) != b"\n":
        handle.readline()  # the rest of a line that starts in the share before
    return handle.tell()


class DatasetsStream:
    """The rows of a hub data set (``name_or_path``, ``subset``, ``split``) or of local files of another format, as
    ``datasets``' ``IterableDataset``, this rank's part chosen by ``datasets.distributed.split_dataset_by_node``.

    Args:
        source: the source.
        rank, world_size: this data-parallel rank and the number of ranks.
        builder, files: for local files, their ``datasets`` builder (``json``, ``csv``, ...) and the files.
    """

    def __init__(self, source: Source, rank: int = 0, world_size: int = 1, builder: Optional[str] = None,
                 files: Optional[list[str]] = None):  # fmt: skip
        import datasets
        from datasets.distributed import split_dataset_by_node

        self.name = source.name_or_path
        try:
            if builder:
                rows = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
            else:
                rows = datasets.load_dataset(source.name_or_path, source.subset, split=source.split, streaming=True)
        except Exception as error:
            subset = f", subset {source.subset!r}" if source.subset else ""
            where = f"(split {source.split!r}{subset}): cannot be streamed from the hub"
            where = "cannot be read" if builder else where
            raise UserError(f"data source {source.name_or_path!r} {where} ({_first_line(error)})") from error
        self.rows = split_dataset_by_node(rows, rank, world_size) if world_size > 1 else rows
        self.epoch, self.read, self._position = 0, 0, None  # _position: datasets' state after the last row read

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        self.rows.set_epoch(self.epoch)
        if self._position is not None:
            self.rows.load_state_dict(self._position)
            self._position = None
        for row in self.rows:
            self.read += 1
            yield self.read - 1, row

    def next_epoch(self) -> None:
        """Start the next pass (``datasets`` shuffles the order of the shards with the epoch)."""
        self.epoch, self.read, self._position = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        """``epoch``, ``read`` (rows) and ``datasets``' own state after the last row yielded (``None`` before the
        first)."""
        position = self._position  # loaded and not applied yet
        if position is None and self.read:
            position = self.rows.state_dict()
        return {"epoch": self.epoch, "read": self.read, "position": position}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the row where ``state`` (from :meth:`state_dict`) was taken."""
        self.epoch, self.read, self._position = state["epoch"], state["read"], state["position"]
