"""Stages 2 and 3 for reward pairs: each row becomes one sample holding its two conversations, the prompt followed by
each answer, rendered and tokenized as the core renders a conversation, and its margin."""

from typing import Optional

from lt_posttrain import RowTokenizer, UserError, tokenize_table

REWARD_PAIRS_VERSION = "1"  # bump when the samples of a pair change, so cached results are not reused
SIDES = ("chosen", "rejected")


def tokenize_reward_pairs(rows, source, tokenizer, max_length: int, chat_template: Optional[str], overlong="truncate",
                          num_proc=None):  # fmt: skip
    """``load_samples``' ``tokenize`` for reward pairs (the arguments of the core's ``tokenize_rows``): one sample per
    row.

    Returns ``(samples, dropped)``: ``samples`` a ``datasets.Dataset`` of ``chosen_input_ids``,
    ``rejected_input_ids``, ``margin``, ``length`` and ``truncated`` (both conversations together) and ``loss_count``
    (1: the step's loss is a mean over pairs); ``dropped`` the rows left out, by reason (an answer with no token within
    ``max_length``, a conversation cut with ``overlong="drop"``, or a template that splits the conversation).
    """
    import datasets

    pairs = RowTokenizer.of(source, tokenizer, max_length, chat_template, overlong)
    if not callable(getattr(pairs.source_type, "margin", None)):
        raise UserError(
            f"data source {source.name_or_path!r}: type {source.type!r} is not reward pairs; a reward model learns "
            "from pairs: set its type to reward_pairs (rows {prompt or messages, chosen, rejected, margin})"
        )
    ids, number = datasets.Sequence(datasets.Value("int64")), datasets.Value("int64")
    features = {"chosen_input_ids": ids, "rejected_input_ids": ids, "margin": datasets.Value("float64"),
                **{column: number for column in ("length", "truncated", "loss_count")}}  # fmt: skip

    def pair_sample(row: dict, index: int):
        pair = pairs.source_type.pair(row, index)
        samples = [pairs.answer(pair.prompt, answer, index) for answer in (pair.chosen, pair.rejected)]
        reason = pairs.drop_reason(samples)
        if reason:
            return reason
        return {
            **{f"{side}_input_ids": sample["input_ids"] for side, sample in zip(SIDES, samples)},
            "margin": pairs.source_type.margin(row, index),
            "length": sum(len(sample["input_ids"]) for sample in samples),
            "truncated": sum(sample["truncated"] for sample in samples),
            "loss_count": 1,
        }

    return tokenize_table(rows, pairs, pair_sample, features, REWARD_PAIRS_VERSION, num_proc)
