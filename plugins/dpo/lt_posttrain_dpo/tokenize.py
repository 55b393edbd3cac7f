"""Stages 2 and 3 for preference pairs: each row becomes one sample that holds both answers, each rendered after the
prompt with the core's renderer and labels; only the answer's own tokens carry a label."""

from typing import Optional

from lt_posttrain import RowTokenizer, UserError, tokenize_table
from lt_posttrain_dpo.pairs import REFERENCE_COLUMNS

PAIRS_VERSION = "1"  # bump when the samples of a pair change, so cached results are not reused
SIDES = ("chosen", "rejected")


def tokenize_pairs(rows, source, tokenizer, max_length: int, chat_template: Optional[str], overlong="truncate",
                   num_proc=None):  # fmt: skip
    """``load_samples``' ``tokenize`` for preference pairs (the arguments of the core's ``tokenize_rows``): one sample
    per row.

    Returns ``(samples, dropped)``: ``samples`` a ``datasets.Dataset`` of ``chosen_input_ids``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_labels``, ``length`` and ``truncated`` (both answers together),
    ``loss_count`` (1: the step's loss is a mean over pairs) and the two reference columns (NaN where the row has
    none); ``dropped`` the rows left out, by reason (an answer with no token within ``max_length``, an answer cut
    with ``overlong="drop"``, or a template that splits the conversation).
    """
    import datasets

    pairs = RowTokenizer.of(source, tokenizer, max_length, chat_template, overlong)
    if not callable(getattr(pairs.source_type, "pair", None)):
        raise UserError(
            f"data source {source.name_or_path!r}: type {source.type!r} reads one conversation per row; preference "
            "data needs pairs: set its type to preference_pairs (rows {prompt or messages, chosen, rejected})"
        )
    ids, number, real = datasets.Sequence(datasets.Value("int64")), datasets.Value("int64"), datasets.Value("float64")
    features = {
        **{f"{side}_{column}": ids for side in SIDES for column in ("input_ids", "labels")},
        **{column: number for column in ("length", "truncated", "loss_count")},
        **{column: real for column in REFERENCE_COLUMNS},
    }

    def pair_sample(row: dict, index: int):
        pair = pairs.source_type.pair(row, index)
        samples = [pairs.answer(pair.prompt, answer, index) for answer in (pair.chosen, pair.rejected)]
        reason = pairs.drop_reason(samples)
        if reason:
            return reason
        return {
            **{f"{side}_{key}": sample[key] for side, sample in zip(SIDES, samples) for key in ("input_ids", "labels")},
            "length": sum(len(sample["input_ids"]) for sample in samples),
            "truncated": sum(sample["truncated"] for sample in samples),
            "loss_count": 1,
            **dict(zip(REFERENCE_COLUMNS, pair.reference)),
        }

    return tokenize_table(rows, pairs, pair_sample, features, PAIRS_VERSION, num_proc)
