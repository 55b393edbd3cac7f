"""Stage 1: a data source (hub id, local file or folder) becomes a table of rows."""

import difflib
import json
import os
import re
from dataclasses import dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Literal, Optional, Union

from lt_posttrain.errors import UserError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class Source:
    """One data source of a recipe: where its rows are, and how a row becomes a conversation.

    Args:
        name_or_path: a hub dataset id (``HuggingFaceH4/ultrachat_200k``), a local ``.json``/``.jsonl``/``.parquet``
            /``.arrow``/``.csv`` file, or a folder of such files.
        split: the split to read (hub datasets; local files have one split, ``train``).
        subset: the hub dataset's subset (configuration name), for data sets that have several, such as ``main`` of
            ``openai/gsm8k``.
        sample_count: keep only the first N rows (after shuffling, if ``shuffle``).
        shuffle: shuffle the rows (with ``seed``) before ``sample_count`` is applied.
        seed: seed of that shuffle.
        type: how a row becomes a conversation: ``messages`` (a column of ``{role, content}`` turns, with
            OpenAI-style ``tool_calls`` and ``tool`` turns),
            ``huggingface_instruct`` (columns mapped to roles with ``role_mapping``), ``prompt_generation``
            (``{"prompt", "generation"}`` rows, rendered as plain text), ``ragfit`` (RAG-FiT's query/answer rows),
            ``text`` (plain text rows, every token trained: continued pre-training), the
            name of a plugin registered under the ``lt_posttrain.source_types`` entry-point group, or a dotted import
            path ``my_package.source_types.MySourceType``.
        weight: this source's share of the training mix. When any training source has a weight, each epoch draws
            from every source in proportion to its weight (a source without one weighs 1), as many samples as all
            sources hold together: a down-weighted source is subsampled, an up-weighted one repeated.
        messages_column: ``messages``: the column holding the list of turns.
        role_mapping: ``huggingface_instruct``: role to where its text is, e.g. ``{user: question, assistant:
            answer}`` (a string column per role) or ``{user: conversations.from.human, assistant:
            conversations.from.gpt}`` (the turns of a list column whose ``from`` field is ``human`` or ``gpt``).
            Omitted: the known mapping of a well-known hub data set, else ``{user: user, assistant: assistant}``.
            Besides roles (``tool`` for tool results), two parts of an assistant turn: ``tool_calls`` (text that is
            the JSON of one call ``{name, arguments}`` or a list of them, e.g. ``answers`` of xLAM) and
            ``reasoning`` (a string column of the answer's reasoning).
        content_key: the field holding a turn's text in a list of turns (``value`` in ShareGPT).
        role_key: ``messages``: the field holding a turn's role.
        input_key: ``prompt_generation``/``ragfit``: the column of the prompt (default ``prompt``); ``text``: the
            column of the text (default ``text``).
        output_key: ``prompt_generation``/``ragfit``: the column of the answer (default ``generation`` for
            ``prompt_generation``; required for ``ragfit``; a list column gives its first item).
        instruction: ``ragfit``: a text file whose content is the system prompt.
        instruction_in_prompt: ``ragfit``: put the instruction before the query in the user turn instead of a system
            turn (for models without a system role).
        template: ``ragfit``: a prompt template (text, or a file) with ``{query}`` and ``{output}`` placeholders, used
            instead of the chat template (for tokenizers without one); the text before ``{output}`` is the prompt.
        completion_start: ``ragfit``: text that the rendered prompt ends with, such as ``<|assistant|>``; loss starts
            right after its last occurrence before the answer.
        mask: which tokens carry loss: ``all_assistant`` (every assistant turn, the default), ``last_assistant``
            (the last assistant turn only; the earlier ones are context), ``all_tokens`` (every token of the
            rendered conversation, for continued pre-training on chats; plain text rows: ``type: text``), or
            ``field`` (per message: an assistant turn is trained unless its ``train`` field is false, its tokens
            weighted by its ``weight`` field, default 1; a weight scales the loss, never the normaliser).
        train_end_of_turn: train the text the template puts after an assistant turn's content (its end-of-turn
            token, such as ``<|im_end|>``); ``false`` trains the content only (and a turn's tool calls), and the
            model never learns to stop.
        train_reasoning: train the reasoning of assistant turns (a message's ``reasoning_content`` or ``thinking``
            field, rendered where the chat template renders it); ``false`` leaves the reasoning untrained (context
            only) while the rest of the turn, its answer and tool calls, stays trained.
        tools_column: ``messages``/``huggingface_instruct``: the column holding the tools (JSON schemas, a list or
            its JSON text) a row's conversation may call; they are given to the chat template as ``tools``. A row
            without the column, or with null, has none.
        options: settings of a plugin type, passed to it as they are.
        streaming: read the rows as they come instead of loading (and, from the hub, downloading) the whole table
            first: tokenized and packed on the fly as training reads them, each data-parallel rank reading its own
            part; a training stream needs ``trainer.max_steps`` and starts over when it ends (see
            ``data/streams.py``). A streamed validation source keeps its first ``sample_count`` rows.
    """

    name_or_path: str
    split: str = "train"
    subset: Optional[str] = None
    sample_count: Optional[int] = None
    shuffle: bool = False
    seed: int = 0
    type: str = "messages"
    weight: Optional[float] = None
    messages_column: str = "messages"
    role_mapping: Optional[dict[str, str]] = None
    content_key: str = "content"
    role_key: str = "role"
    input_key: Optional[str] = None
    output_key: Optional[str] = None
    instruction: Optional[str] = None
    instruction_in_prompt: bool = False
    template: Optional[str] = None
    completion_start: Optional[str] = None
    mask: Literal["all_assistant", "last_assistant", "all_tokens", "field"] = "all_assistant"
    train_end_of_turn: bool = True
    train_reasoning: bool = True
    tools_column: str = "tools"
    options: dict = field(default_factory=dict)
    streaming: bool = False


def as_source(entry: Union[str, Source, dict]) -> Source:
    """A :class:`Source` from a path or hub id, a mapping of its fields, or a ``Source``."""
    if isinstance(entry, Source):
        return entry
    if isinstance(entry, dict):
        known = [item.name for item in fields(Source)]
        for key in entry:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                raise UserError(f"data source {entry.get('name_or_path', entry)!r}: unknown key {key!r} ({hint})")
        if "name_or_path" not in entry:
            raise UserError(f"data source {entry!r}: no 'name_or_path' (give a hub id or a local file)")
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
    """The rows of ``source`` as a ``datasets.Dataset``; of a streamed source, its first ``sample_count`` rows."""
    import datasets

    if source.streaming:
        return _first_rows_of_stream(source)
    path = Path(source.name_or_path).expanduser()
    if path.exists():
        builder, files = _local_format(path)
        empty = [file for file in files if os.path.getsize(file) == 0]
        if empty:
            raise UserError(f"data source {str(path)!r}: {empty[0]} is empty (give a file with rows)")
        try:
            rows = datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as error:  # malformed JSON and friends: name the file and line, not the parser internals
            problem = _json_problem(files) if builder == "json" else None
            raise UserError(f"data source {str(path)!r}: {problem or f'cannot read it ({_first_line(error)})'}") from error
        if len(rows) == 0:
            raise UserError(f"data source {str(path)!r}: no rows (give a file with rows)")
    elif path.suffix in LOCAL_FORMATS or os.sep in source.name_or_path and not _HUB_ID.match(source.name_or_path):
        raise UserError(f"data source {source.name_or_path!r}: no such file or folder")
    else:
        try:
            rows = datasets.load_dataset(source.name_or_path, source.subset, split=source.split)
        except Exception as error:
            subset = f", subset {source.subset!r}" if source.subset else ""
            raise UserError(
                f"data source {source.name_or_path!r} (split {source.split!r}{subset}): not a local path and cannot be "
                f"loaded from the hub ({_first_line(error)})"
            ) from error
    if source.shuffle:
        rows = rows.shuffle(seed=source.seed)
    if source.sample_count is not None:
        rows = rows.select(range(min(source.sample_count, len(rows))))
    return rows


def _first_rows_of_stream(source: Source):
    """The first ``sample_count`` rows of streamed ``source``, as a table (validation and test data are tables)."""
    import datasets

    from lt_posttrain.data.streams import open_stream  # streams.py reads this module's helpers

    if source.sample_count is None:
        raise UserError(f"data source {source.name_or_path!r} is streamed: as validation, test or prediction data it "
                        "needs sample_count (its first rows are kept)")  # fmt: skip
    rows = [row for _, row in islice(open_stream(source), source.sample_count)]
    if not rows:
        raise UserError(f"data source {source.name_or_path!r}: no rows (give a file with rows)")
    return datasets.Dataset.from_list(rows)


def _json_problem(files: list[str]) -> Optional[str]:
    """What the data set library could not read in JSON (or JSON Lines) files, naming the file and line: the first
    malformed line, a row that is not a JSON object, or a column whose values are of two kinds."""
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            if not (error.msg == "Extra data" or file.endswith(".jsonl")):  # a JSON document, not JSON Lines
                return f"{file}, line {error.lineno}: malformed JSON ({error.msg}); fix or remove that line"
        else:
            if isinstance(document, list):
                problem = _rows_problem(file, ((f"row {n}", row) for n, row in enumerate(document)))
                if problem:
                    return problem
            continue
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    return f"{file}, line {number}: malformed JSON ({error.msg}); fix or remove that line"
        problem = _rows_problem(file, rows)
        if problem:
            return problem
    return None


def _rows_problem(file: str, rows) -> Optional[str]:
    """A row of ``rows`` (``(where, value)``) that is not a JSON object, or a column of two kinds of value."""
    kinds: dict[str, tuple[str, str]] = {}  # column -> (kind, where first seen)
    for where, row in rows:
        if not isinstance(row, dict):
            return f"{file}, {where}: a row must be a JSON object ({{\"column\": value, ...}}), got {_kind(row)}"
        for column, value in row.items():
            if value is None:
                continue
            seen = kinds.setdefault(column, (_kind(value), where))
            if seen[0] != _kind(value):
                return (f"{file}, {where}: column {column!r} holds {_kind(value)}, but {seen[0]} in {seen[1]}; give "
                        "each column one kind of value")  # fmt: skip
    return None


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
