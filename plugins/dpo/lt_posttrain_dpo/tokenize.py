"""Stages 2 and 3 for preference pairs: each row becomes one sample that holds both answers, each rendered after the
prompt with the core's renderer and labels; only the answer's own tokens carry a label."""

import os
from typing import Optional

from lt_posttrain.data.dataset import FORMAT_VERSION, LONGER_THAN_MAX, NO_LOSS_TOKEN, map_and_drop, rendered_parts
from lt_posttrain.data.source_types import load_source_type
from lt_posttrain.data.tokenize import RenderedConversation, count_loss_tokens, tokenize_rendered
from lt_posttrain.errors import UserError
from lt_posttrain_dpo.pairs import REFERENCE_COLUMNS

PAIRS_VERSION = "1"  # bump when the samples of a pair change, so cached results are not reused
SIDES = ("chosen", "rejected")
SPLIT_BY_TEMPLATE = "the chat template rewrites earlier turns, so an answer is not one sequence"


def answer_sample(prompt: list[dict], answer: list[dict], render, tokenizer, max_length: int, where: str):
    """``prompt + answer`` rendered as the core renders a conversation (:func:`rendered_parts`) and tokenized, labels
    on the answer's assistant turns only (assistant turns of the prompt are context): ``{"input_ids", "labels",
    "truncated"}``, or None when the template splits the conversation. ``where`` names the source and row in errors."""
    parts = rendered_parts(prompt + answer, render, where)
    if len(parts) > 1:
        return None
    if not parts:  # nothing to score
        return {"input_ids": [], "labels": [], "truncated": 0}
    text = parts[0].text
    answer_start = len(os.path.commonprefix([render(prompt, True), text])) if prompt else 0
    spans = [(max(start, answer_start), end) for start, end in parts[0].spans if end > answer_start]
    return tokenize_rendered(RenderedConversation(text, spans), tokenizer, max_length)


def tokenize_pairs(rows, source, tokenizer, max_length: int, chat_template: Optional[str], overlong="truncate",
                   num_proc=None):  # fmt: skip
    """:func:`lt_posttrain.data.dataset.tokenize_rows` for preference pairs (same arguments): one sample per row.

    Returns ``(samples, dropped)``: ``samples`` a ``datasets.Dataset`` of ``chosen_input_ids``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_labels``, ``length`` and ``truncated`` (both answers together),
    ``loss_count`` (1: the step's loss is a mean over pairs) and the two reference columns (NaN where the row has
    none); ``dropped`` the rows left out, by reason (an answer with no token within ``max_length``, an answer cut
    with ``overlong="drop"``, or a template that splits the conversation).
    """
    import datasets

    pairs_format = load_source_type(source)
    if not callable(getattr(pairs_format, "pair", None)):
        raise UserError(
            f"data source {source.name_or_path!r}: type {source.type!r} reads one conversation per row; preference "
            "data needs pairs: set its type to preference_pairs (rows {prompt or messages, chosen, rejected})"
        )
    render = pairs_format.resolved_renderer(tokenizer, chat_template)
    where = f"data source {source.name_or_path!r}"
    ids, number, real = datasets.Sequence(datasets.Value("int64")), datasets.Value("int64"), datasets.Value("float64")
    features = datasets.Features({
        **{f"{side}_{column}": ids for side in SIDES for column in ("input_ids", "labels")},
        **{column: number for column in ("length", "truncated", "loss_count")},
        **{column: real for column in REFERENCE_COLUMNS},
        "dropped": datasets.Value("string"),
    })  # fmt: skip

    def convert(batch, indices):
        out = {column: [] for column in features}
        for offset, index in enumerate(indices):
            pair = pairs_format.pair({column: values[offset] for column, values in batch.items()}, index)
            samples = [answer_sample(pair.prompt, answer, render, tokenizer, max_length, f"{where}, row {index}")
                       for answer in (pair.chosen, pair.rejected)]  # fmt: skip
            reason = _drop_reason(samples, overlong)
            for side, sample in zip(SIDES, samples):
                out[f"{side}_input_ids"].append(sample["input_ids"] if not reason else [])
                out[f"{side}_labels"].append(sample["labels"] if not reason else [])
            out["length"].append(0 if reason else sum(len(sample["input_ids"]) for sample in samples))
            out["truncated"].append(0 if reason else sum(sample["truncated"] for sample in samples))
            out["loss_count"].append(0 if reason else 1)
            for column, value in zip(REFERENCE_COLUMNS, pair.reference):
                out[column].append(value)
            out["dropped"].append(reason)
        return out

    template = chat_template or tokenizer.chat_template or ""
    identity = (
        f"{FORMAT_VERSION}|{PAIRS_VERSION}|{rows._fingerprint}|{tokenizer.name_or_path}|{len(tokenizer)}|{template}|"
        f"{max_length}|{overlong}|{pairs_format.identity()}"
    )
    return map_and_drop(rows, convert, features, identity, num_proc, f"Tokenizing pairs of {source.name_or_path}")


def _drop_reason(samples: list, overlong: str) -> str:
    if any(sample is None for sample in samples):
        return SPLIT_BY_TEMPLATE
    if any(count_loss_tokens(sample["labels"]) == 0 for sample in samples):
        return NO_LOSS_TOKEN
    if overlong == "drop" and any(sample["truncated"] for sample in samples):
        return LONGER_THAN_MAX
    return ""
