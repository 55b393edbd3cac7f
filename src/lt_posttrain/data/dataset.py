"""The tokenized samples of a recipe's sources, and the micro-batches the plan asks for."""

import hashlib
import os
from collections import Counter
from itertools import islice
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from jinja2.exceptions import TemplateError
from torch.utils.data import Dataset

from lt_posttrain.batch import IGNORE_INDEX
from lt_posttrain.data.collate import collate_packed, collate_padded
from lt_posttrain.data.plan import MicroBatch
from lt_posttrain.data.source_types import RenderError, load_source_type
from lt_posttrain.data.sources import Source, load_rows
from lt_posttrain.data.tokenize import (
    TRAINED_ROLES,
    MaskError,
    Masking,
    RenderedConversation,
    count_loss_tokens,
    message_problem,
    render_conversation,
    tokenize_rendered,
    tokenize_rendered_batch,
)
from lt_posttrain.errors import UserError

FORMAT_VERSION = "7"  # bump when tokenization changes, so cached results are not reused

NO_ASSISTANT_TURN = "no assistant turn"
NO_LOSS_TOKEN = "no answer token within max_length"
LONGER_THAN_MAX = "longer than max_length (data.overlong: drop)"
_COLUMNS = ("input_ids", "labels", "truncated", "length", "loss_count")
_EMPTY = {"input_ids": [], "labels": [], "truncated": 0}  # stands in for a dropped row until it is counted


def masking_of(source: Source) -> Masking:
    """The tokens ``source`` trains: its ``mask``, ``train_end_of_turn`` and ``train_reasoning``."""
    if source.mask == "all_tokens" and not source.train_reasoning:
        raise UserError(
            f"data source {source.name_or_path!r}: mask all_tokens trains every token, the reasoning too: remove "
            "train_reasoning: false, or use mask all_assistant"
        )
    return Masking(source.mask, source.train_end_of_turn, source.train_reasoning)


def rendered_parts(
    messages: list[dict], render, where: str, masking: Masking = Masking(), tools: list[dict] | None = None
) -> list:
    """Stage 3a for one conversation (which may call ``tools``): its rendered parts with loss spans (none without
    an assistant turn, unless ``masking`` trains every token). ``where`` names the source and row in errors."""
    problem = message_problem(messages)
    if problem:
        raise UserError(f"{where}: {problem}")
    if not messages or masking.mask != "all_tokens" and not any(m["role"] in TRAINED_ROLES for m in messages):
        return []
    try:
        return render_conversation(messages, render, masking, tools)
    except (RenderError, MaskError) as error:
        raise UserError(f"{where}: {error}") from error
    except TemplateError as error:  # raise_exception() of the template: roles out of order, two calls at once, ...
        raise UserError(f"{where}: the chat template cannot render this conversation: {error}") from error


def conversation_samples(
    messages: list[dict],
    render,
    tokenizer,
    max_length: int,
    where: str,
    masking: Masking = Masking(),
    tools: list[dict] | None = None,
) -> list[dict]:
    """Stage 3 for one conversation (which may call ``tools``): its samples that carry loss (none without an
    assistant turn). ``where`` names the source and row in errors."""
    parts = rendered_parts(messages, render, where, masking, tools)
    samples = tokenize_rendered_batch(parts, tokenizer, max_length)
    return [sample for sample in samples if count_loss_tokens(sample["labels"])]


def tokenize_rows(
    rows, source: Source, tokenizer, max_length: int, chat_template: str | None, overlong="truncate", num_proc=None
):
    """Stages 2 and 3 over a table of rows: each row becomes a conversation (and the tools it may call) with the
    source type its ``type`` names and is rendered with the source type's renderer, else the chat template.

    Returns ``(samples, dropped)``: ``samples`` a ``datasets.Dataset`` of ``input_ids``, ``labels``, ``truncated``,
    ``length``, ``loss_count`` (and ``weight`` when the rows have a ``weight`` column: it scales the sample's token
    losses, never the normaliser); ``dropped`` the rows left out, by reason (no assistant turn, or no answer token
    within ``max_length``, or longer than ``max_length`` with ``overlong="drop"``). Cached with the rows', so a second
    run with the same rows and options does no work; ``num_proc`` processes tokenize in parallel.
    """
    converter = RowConverter.of(source, tokenizer, max_length, chat_template, overlong)
    identity = cache_identity(rows, converter.source_type, tokenizer, chat_template, max_length, overlong)
    features = _features("weight" in rows.column_names, converter.by_token)
    return map_and_drop(rows, converter, features, identity, num_proc, f"Tokenizing {source.name_or_path}")


@dataclass
class RowConverter:
    """Stages 2 and 3 for the rows of one source, a batch at a time: what :func:`tokenize_rows` maps over a table and
    what a streamed source runs on the rows as they come (``data/streaming.py``), so both give the same samples and
    masks. Make one with :meth:`of`; call it with a batch of rows as columns and their indices.

    Attributes:
        source, source_type, render, masking: the source, its type, renderer and masking.
        tokenizer, max_length, overlong: as the data module has them.
        by_token: each trained message may weigh its tokens (``mask: field``): samples get ``token_weights``.
    """

    source: Source
    source_type: Any
    render: Callable
    masking: Masking
    tokenizer: Any
    max_length: int
    overlong: str

    @classmethod
    def of(cls, source: Source, tokenizer, max_length: int, chat_template: str | None, overlong: str = "truncate"):
        """The converter of ``source`` (its source type loaded, renderer resolved, masking checked)."""
        source_type = load_source_type(source)
        render = source_type.resolved_renderer(tokenizer, chat_template)
        return cls(source, source_type, render, masking_of(source), tokenizer, max_length, overlong)

    @property
    def by_token(self) -> bool:
        return self.masking.mask == "field"

    def where(self, index) -> str:
        """Row ``index`` of the source, for error messages."""
        return f"data source {self.source.name_or_path!r}, row {index}"

    def __call__(self, batch: dict, indices) -> dict:
        """The samples of a batch of rows (``{column: values}``; rows with a ``weight`` column weigh their samples'
        losses), as columns: ``input_ids``, ``labels``, ``truncated``, ``length``, ``loss_count``, ``dropped`` (a row
        that gives no sample has one empty sample with its reason there; the others ``""``), and ``weight`` and
        ``token_weights`` where they apply."""
        weighted = "weight" in batch
        columns = _COLUMNS + (("weight",) if weighted else ()) + (("token_weights",) if self.by_token else ())
        out = {key: [] for key in columns + ("dropped",)}

        def add(sample: dict, loss_count: int, weight: float, dropped: str = "") -> None:
            for key in ("input_ids", "labels", "truncated"):
                out[key].append(sample[key])
            out["length"].append(len(sample["input_ids"]))
            out["loss_count"].append(loss_count)
            out["dropped"].append(dropped)
            if weighted:
                out["weight"].append(weight)
            if self.by_token:
                out["token_weights"].append(sample.get("token_weights", []))

        masking, source_type = self.masking, self.source_type
        conversations, parts = [], []  # render every row of the batch, then tokenize them in one call
        for offset, index in enumerate(indices):
            row = {column: values[offset] for column, values in batch.items()}
            messages, tools = source_type.messages(row, index), source_type.tools(row, index)
            rendered = rendered_parts(messages, self.render, self.where(index), masking, tools)
            weight = row_weight(row, self.where(index)) if weighted else 1.0
            conversations.append((messages, weight, len(rendered)))
            parts += rendered
        tokenized = iter(tokenize_rendered_batch(parts, self.tokenizer, self.max_length))
        for messages, weight, count in conversations:
            samples = [sample for sample in islice(tokenized, count) if count_loss_tokens(sample["labels"])]
            kept = [sample for sample in samples if self.overlong == "truncate" or not sample["truncated"]]
            for sample in kept:
                add(sample, count_loss_tokens(sample["labels"]), weight)
            if not kept:
                has_turn = masking.mask == "all_tokens" or any(m["role"] in TRAINED_ROLES for m in messages)
                reason = LONGER_THAN_MAX if samples else NO_LOSS_TOKEN if has_turn else NO_ASSISTANT_TURN
                add(_EMPTY, 0, weight, reason)
        return out


def row_weight(row: dict, where: str) -> float:
    """The ``weight`` column of ``row``: a number >= 0 (a sample's token losses are scaled by it; a row without one,
    null or absent, weighs 1), else one line."""
    weight = row.get("weight")
    if weight is None:
        return 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise UserError(f"{where}: weight must be a number >= 0, got {weight!r:.40}: fix the row (or drop the column)")
    return float(weight)


def cache_identity(rows, source_type, tokenizer, chat_template, max_length: int, overlong: str, *versions: str) -> str:
    """Everything the samples of ``rows`` depend on, for :func:`map_and_drop`'s cache: the rows, the tokenizer and
    template, the options, the source type's settings, this module's :data:`FORMAT_VERSION` and the caller's
    ``versions`` (bumped when its samples change)."""
    template = chat_template or tokenizer.chat_template or ""
    return "|".join([FORMAT_VERSION, *versions, rows._fingerprint, tokenizer.name_or_path, str(len(tokenizer)),
                     template, str(max_length), overlong, source_type.identity()])  # fmt: skip


def map_and_drop(rows, convert, features, identity: str, num_proc: Optional[int], desc: str):
    """``rows.map(convert)`` in batches, cached by the datasets library under a fingerprint of ``identity`` (every
    option the result depends on), then without the rows ``convert`` marked in its ``dropped`` column.

    Returns ``(dataset, {reason: rows dropped})``.
    """
    converted = rows.map(
        convert,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        features=features,
        new_fingerprint=hashlib.sha256(identity.encode()).hexdigest()[:32],
        num_proc=num_proc if num_proc and num_proc > 1 and len(rows) >= 2 * num_proc else None,
        desc=desc,
    )
    reasons = converted["dropped"][:]
    dropped = Counter(reason for reason in reasons if reason)
    if dropped:
        converted = converted.select([index for index, reason in enumerate(reasons) if not reason])
    return converted.remove_columns("dropped"), dict(dropped)


def _features(weighted: bool, by_token: bool = False):
    import datasets

    ids, number = datasets.Sequence(datasets.Value("int64")), datasets.Value("int64")
    features = {"input_ids": ids, "labels": ids, "truncated": number, "length": number, "loss_count": number}
    if weighted:
        features["weight"] = datasets.Value("float64")
    if by_token:
        features["token_weights"] = datasets.Sequence(datasets.Value("float32"))
    return datasets.Features({**features, "dropped": datasets.Value("string")})


# -- rows that are not one conversation: a prompt and answers to it, paired (DPO, a reward model) or labelled (KTO) --
SPLIT_BY_TEMPLATE = "the chat template rewrites earlier turns, so an answer is not one sequence"


def tokenize_answer(prompt: list[dict], answer: list[dict], render, tokenizer, max_length: int, where: str):
    """``prompt + answer`` rendered as a conversation is (:func:`rendered_parts`) and tokenized, with labels on the
    answer's assistant turns only (assistant turns of the prompt are context): ``{"input_ids", "labels",
    "truncated"}``, or None when the template splits the conversation (it rewrites earlier turns). ``where`` names the
    source and row in errors."""
    parts = rendered_parts(prompt + answer, render, where)
    if len(parts) > 1:
        return None
    if not parts:  # nothing to score
        return {"input_ids": [], "labels": [], "truncated": 0}
    text = parts[0].text
    answer_start = len(os.path.commonprefix([render(prompt, True), text])) if prompt else 0
    spans = [(max(start, answer_start), end) for start, end in parts[0].spans if end > answer_start]
    return tokenize_rendered(RenderedConversation(text, spans), tokenizer, max_length)


def first_label(labels: list[int]) -> int:
    """The position of the first token with a label (where the answer starts in a :func:`tokenize_answer` sample),
    or ``len(labels)`` if none has one."""
    return next((position for position, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


@dataclass
class RowTokenizer:
    """What the rows of one source need to become token ids: its source type, the renderer (the type's own, else the
    chat template) and the options. For data modules whose rows are not one conversation (see
    :func:`tokenize_table`); make one with :meth:`of`.

    Attributes:
        source: the data source; ``source_type`` the source type reading its rows (a plugin's, with its own methods
            such as ``pair(row, index)``); ``render`` its renderer.
        tokenizer, chat_template, max_length, overlong: as the data module has them.
    """

    source: Source
    source_type: Any
    render: Callable
    tokenizer: Any
    chat_template: Optional[str]
    max_length: int
    overlong: str

    @classmethod
    def of(cls, source: Source, tokenizer, max_length: int, chat_template: Optional[str], overlong: str = "truncate"):
        """The row tokenizer of ``source`` (its source type loaded, its renderer resolved)."""
        source_type = load_source_type(source)
        render = source_type.resolved_renderer(tokenizer, chat_template)
        return cls(source, source_type, render, tokenizer, chat_template, max_length, overlong)

    def where(self, index: int) -> str:
        """Row ``index`` of the source, for error messages."""
        return f"data source {self.source.name_or_path!r}, row {index}"

    def answer(self, prompt: list[dict], answer: list[dict], index: int) -> Optional[dict]:
        """:func:`tokenize_answer` of row ``index``'s ``prompt`` and ``answer``."""
        return tokenize_answer(prompt, answer, self.render, self.tokenizer, self.max_length, self.where(index))

    def drop_reason(self, samples: list[Optional[dict]]) -> str:
        """Why a row whose answers gave ``samples`` (from :meth:`answer`) is left out, or ``""`` to keep it: a
        template that splits a conversation (:data:`SPLIT_BY_TEMPLATE`), an answer without a labelled token within
        ``max_length`` (:data:`NO_LOSS_TOKEN`), or one cut with ``overlong="drop"`` (:data:`LONGER_THAN_MAX`)."""
        if any(sample is None for sample in samples):
            return SPLIT_BY_TEMPLATE
        if any(count_loss_tokens(sample["labels"]) == 0 for sample in samples):
            return NO_LOSS_TOKEN
        if self.overlong == "drop" and any(sample["truncated"] for sample in samples):
            return LONGER_THAN_MAX
        return ""


def tokenize_table(rows, row_tokenizer: RowTokenizer, convert_row: Callable, features: dict, version: str,
                   num_proc: Optional[int] = None):  # fmt: skip
    """Stages 2 and 3 over a table for rows that each become one training unit of any shape (a pair of answers, a
    labelled answer): ``convert_row(row, index)`` returns the unit's columns (every key of ``features``), or a drop
    reason (a string, e.g. from :meth:`RowTokenizer.drop_reason`) to leave the row out. Cached as :func:`tokenize_rows`
    is, so a second run with the same rows and options does no work.

    Args:
        rows: the source's table (``load_rows(source)``).
        row_tokenizer: the source's :class:`RowTokenizer`.
        convert_row: ``(row, index) -> dict | str``.
        features: the columns' ``datasets`` features (a unit needs ``length``, its tokens, and ``loss_count``, what the
            step's loss is divided by; ``input_ids`` and ``labels`` if the core's batches are made from it).
        version: bump it when ``convert_row``'s results change, so cached results are not reused.
        num_proc: processes that convert in parallel.

    Returns:
        ``(samples, dropped)`` as :func:`tokenize_rows` returns them.
    """
    import datasets

    # what a dropped row holds until it is removed, before anyone reads it
    empty = {column: "" if feature == datasets.Value("string") else 0 if isinstance(feature, datasets.Value) else []
             for column, feature in features.items()}  # fmt: skip
    features = datasets.Features({**features, "dropped": datasets.Value("string")})

    def convert(batch, indices):
        out = {column: [] for column in features}
        for offset, index in enumerate(indices):
            unit = convert_row({column: values[offset] for column, values in batch.items()}, index)
            reason = unit if isinstance(unit, str) else ""
            for column in empty:
                out[column].append(empty[column] if reason else unit[column])
            out["dropped"].append(reason)
        return out

    context = row_tokenizer
    identity = cache_identity(rows, context.source_type, context.tokenizer, context.chat_template, context.max_length,
                              context.overlong, version)  # fmt: skip
    return map_and_drop(rows, convert, features, identity, num_proc, f"Tokenizing {context.source.name_or_path}")


def load_samples(
    sources: list[Source],
    tokenizer,
    max_length: int,
    chat_template: str | None,
    overlong="truncate",
    num_proc=None,
    tokenize=None,
):
    """All sources tokenized and concatenated: ``(samples, dropped)``, a ``datasets.Dataset`` (with a ``source``
    column, the index of each sample's source) and the rows left out, counted by ``(source name, reason)``.
    ``tokenize`` replaces :func:`tokenize_rows` (same arguments and result), for samples of another shape."""
    import datasets

    tokenize = tokenize or tokenize_rows
    parts, dropped = [], Counter()
    for number, source in enumerate(sources):
        samples, reasons = tokenize(load_rows(source), source, tokenizer, max_length, chat_template, overlong, num_proc)
        parts.append(samples.add_column("source", [number] * len(samples)))
        dropped.update({(source.name_or_path, reason): count for reason, count in reasons.items()})
    if any("weight" in part.column_names for part in parts):  # unweighted sources weigh 1
        parts = [
            part if "weight" in part.column_names else part.add_column("weight", [1.0] * len(part)) for part in parts
        ]
    if any("token_weights" in part.column_names for part in parts):  # and so does each of their tokens
        parts = [part if "token_weights" in part.column_names else _with_unit_token_weights(part) for part in parts]
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), dict(dropped)


def _with_unit_token_weights(samples):
    import datasets

    features = datasets.Features({**samples.features, "token_weights": datasets.Sequence(datasets.Value("float32"))})
    return samples.map(
        lambda batch: {"token_weights": [[1.0] * length for length in batch["length"]]},
        batched=True,
        features=features,
        desc="Token weights",
    )


def describe_dropped(dropped: dict) -> str:
    """``dropped`` (from :func:`load_samples`) in words: how many rows, of which source, and why."""
    if not dropped:
        return "no row was dropped"
    total = sum(dropped.values())
    details = "; ".join(f"{count} from {name!r}: {reason}" for (name, reason), count in sorted(dropped.items()))
    return f"{total} row{'s' if total != 1 else ''} dropped ({details})"


SAMPLE_KEYS = ("input_ids", "labels", "weight", "token_weights")
"""The keys of a tokenized sample that its micro-batch's tensors are made from."""


def collate_micro_batch(samples: list[dict], packing: bool, pad_id: int, loss_count: int, step_loss_count: int) -> dict:
    """The tensors of one micro-batch of ``samples`` (packed into one row, or padded) with its loss counts: its own
    ``loss_count`` and ``step_loss_count``, this rank's share of its optimizer step's."""
    batch = collate_packed(samples) if packing else collate_padded(samples, pad_id)
    batch["loss_count"] = torch.tensor(loss_count)
    batch["step_loss_count"] = torch.tensor(step_loss_count)
    return batch


class MicroBatchDataset(Dataset):
    """Indexed by a :class:`MicroBatch` (from ``PlanSampler``): returns its collated tensors plus its loss counts."""

    def __init__(self, samples, packing: bool, pad_id: int):
        self.samples, self.packing, self.pad_id = samples, packing, pad_id

    def __getitem__(self, micro_batch: MicroBatch) -> dict:
        indices = [index for pack in micro_batch.packs for index in pack]
        columns = self.samples[indices] if indices else {"input_ids": [], "labels": []}
        names = [name for name in SAMPLE_KEYS if name in columns]
        samples = [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]
        return collate_micro_batch(samples, self.packing, self.pad_id, micro_batch.loss_count,
                                   micro_batch.step_loss_count)  # fmt: skip

    def __len__(self) -> int:
        return len(self.samples)
