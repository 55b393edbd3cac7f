"""Stages 2 and 3 for labelled answers: each row becomes one sample, its prompt and answer rendered as the core
renders a conversation, labels on the answer's own tokens only, with its label and where its answer starts (so that
the KL estimate can put another row's answer after this prompt)."""

from typing import Optional

from lt_posttrain import RowTokenizer, UserError, first_label, tokenize_table

LABELLED_VERSION = "1"  # bump when the samples change, so cached results are not reused


def tokenize_labelled(rows, source, tokenizer, max_length: int, chat_template: Optional[str], overlong="truncate",
                      num_proc=None):  # fmt: skip
    """``load_samples``' ``tokenize`` for labelled answers (the arguments of the core's ``tokenize_rows``): one sample
    per row.

    Returns ``(samples, dropped)``: ``samples`` a ``datasets.Dataset`` of ``input_ids``, ``labels``, ``desirable``
    (1 or 0), ``answer_start`` (the position of the answer's first labelled token: the tokens before it are the
    prompt), ``length``, ``truncated`` and ``loss_count`` (1: the step's loss is a mean over answers); ``dropped`` the
    rows left out, by reason (no answer token within ``max_length``, an answer cut with ``overlong="drop"``, or a
    template that splits the conversation).
    """
    import datasets

    answers = RowTokenizer.of(source, tokenizer, max_length, chat_template, overlong)
    if not callable(getattr(answers.source_type, "labelled", None)):
        raise UserError(
            f"data source {source.name_or_path!r}: type {source.type!r} reads one conversation per row; KTO needs "
            "labelled answers: set its type to labelled_completions (rows {prompt or messages, completion, label})"
        )
    ids, number = datasets.Sequence(datasets.Value("int64")), datasets.Value("int64")
    features = {"input_ids": ids, "labels": ids,
                **{column: number for column in ("desirable", "answer_start", "length", "truncated", "loss_count")}}

    def labelled_sample(row: dict, index: int):
        labelled = answers.source_type.labelled(row, index)
        sample = answers.answer(labelled.prompt, labelled.completion, index)
        reason = answers.drop_reason([sample])
        if reason:
            return reason
        return {**sample, "desirable": int(labelled.desirable), "answer_start": first_label(sample["labels"]),
                "length": len(sample["input_ids"]), "loss_count": 1}  # fmt: skip

    return tokenize_table(rows, answers, labelled_sample, features, LABELLED_VERSION, num_proc)
