"""Rows that are a prompt and answers to it (paired or labelled): an answer is tokenized as its conversation is, with
labels on the answer only; a table of such rows is converted, dropped by reason and cached like SFT's."""

import pytest

from conftest import write_jsonl
from lt_posttrain import (
    IGNORE_INDEX,
    LONGER_THAN_MAX,
    NO_LOSS_TOKEN,
    RowTokenizer,
    Source,
    UserError,
    first_label,
    load_samples,
    tokenize_table,
)
from lt_posttrain.data.tokenize import tokenize_conversation


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def labelled_text(sample: dict, tokenizer) -> str:
    return tokenizer.decode([token for token, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX])


def test_an_answer_is_tokenized_as_its_conversation_with_labels_on_the_answer_only(tokenizer, tmp_path):
    source = Source(name_or_path=str(write_jsonl(tmp_path / "rows.jsonl", [{"x": 1}])))
    rows = RowTokenizer.of(source, tokenizer, max_length=512, chat_template=None)
    prompt = [turn("user", "Name a colour."), turn("assistant", "Red."), turn("user", "Another one?")]
    answer = [turn("assistant", "Blue.")]
    sample = rows.answer(prompt, answer, index=0)
    whole = tokenize_conversation(prompt + answer, tokenizer, 512)[0]
    assert sample["input_ids"] == whole["input_ids"]  # rendered as the conversation is
    assert "Red." in labelled_text(whole, tokenizer) and "Red." not in labelled_text(sample, tokenizer)
    assert labelled_text(sample, tokenizer).startswith("Blue.")
    start = first_label(sample["labels"])
    assert all(label == IGNORE_INDEX for label in sample["labels"][:start])
    assert tokenizer.decode(sample["input_ids"][start:]).startswith("Blue.")
    assert first_label([IGNORE_INDEX, IGNORE_INDEX]) == 2


def test_answer_turns_reads_text_or_turns(tokenizer, tmp_path):
    source = Source(name_or_path=str(write_jsonl(tmp_path / "rows.jsonl", [{"x": 1}])))
    source_type = RowTokenizer.of(source, tokenizer, 512, None).source_type
    assert source_type.answer_turns("Yes.", 0, "completion") == [turn("assistant", "Yes.")]
    turns = [turn("assistant", "Let me see."), turn("user", "Go on."), turn("assistant", "Yes.")]
    assert source_type.answer_turns(turns, 0, "completion") == turns
    with pytest.raises(UserError, match=r"row 3: 'completion' must be text or a list of \{'role', 'content'\} turns"):
        source_type.answer_turns(7, 3, "completion")


def test_a_table_of_labelled_answers_keeps_drops_and_caches(tokenizer, tmp_path):
    import datasets

    rows = [
        {"prompt": "2 + 2?", "completion": "4", "label": True},
        {"prompt": "3 + 3?", "completion": "7", "label": False},
        {"prompt": "Count.", "completion": " ".join(["one"] * 400), "label": True},  # longer than max_length
        {"prompt": " ".join(["word"] * 400), "completion": "Yes.", "label": True},  # the answer starts past max_length
    ]
    path = write_jsonl(tmp_path / "labelled.jsonl", rows)
    ids, number = datasets.Sequence(datasets.Value("int64")), datasets.Value("int64")
    features = {"input_ids": ids, "labels": ids, "desirable": number, "length": number, "loss_count": number}
    calls = []

    def tokenize_labelled(table, source, tokenizer, max_length, chat_template, overlong="truncate", num_proc=None):
        labelled = RowTokenizer.of(source, tokenizer, max_length, chat_template, overlong)

        def convert_row(row: dict, index: int):
            calls.append(index)
            answer = labelled.source_type.answer_turns(row["completion"], index, "completion")
            sample = labelled.answer([turn("user", row["prompt"])], answer, index)
            reason = labelled.drop_reason([sample])
            if reason:
                return reason
            return {"input_ids": sample["input_ids"], "labels": sample["labels"], "desirable": int(row["label"]),
                    "length": len(sample["input_ids"]), "loss_count": 1}  # fmt: skip

        return tokenize_table(table, labelled, convert_row, features, version="test-1", num_proc=num_proc)

    def load(overlong: str):
        sources = [Source(name_or_path=str(path))]
        return load_samples(sources, tokenizer, 64, None, overlong, None, tokenize=tokenize_labelled)

    samples, dropped = load("drop")
    assert samples["desirable"] == [1, 0] and samples["loss_count"] == [1, 1]
    assert [labelled_text(sample, tokenizer).split("<")[0] for sample in samples] == ["4", "7"]
    assert dropped == {(str(path), LONGER_THAN_MAX): 1, (str(path), NO_LOSS_TOKEN): 1}
    converted = len(calls)
    assert load("drop")[1] == dropped and len(calls) == converted  # served from the cache
    samples, dropped = load("truncate")  # another option: converted again
    assert len(calls) == 2 * converted and len(samples) == 3 and dropped == {(str(path), NO_LOSS_TOKEN): 1}
