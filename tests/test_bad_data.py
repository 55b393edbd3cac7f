"""Bad data gets one clear line (file, line, what to do); long samples are cut or dropped and counted; parallel
tokenizing gives the same samples."""

import json

import pytest

from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import InstructDataModule
from lt_posttrain.data.sources import Source, load_rows
from lt_posttrain.errors import UserError


def prepared(tokenizer, sources, **kwargs) -> InstructDataModule:
    data = InstructDataModule(sources, **kwargs)
    data.connect(tokenizer)
    data.setup("fit")
    return data


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "chats.jsonl"
    lines = [json.dumps(row) for row in gsm8k_chats(3)]
    lines.insert(2, '{"messages": [{"role": "user", "content": "unterminated}')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"chats\.jsonl, line 3: malformed JSON"):
        load_rows(Source(str(path)))


def test_malformed_json_document_is_named(tmp_path):
    path = tmp_path / "chats.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n')
    with pytest.raises(UserError, match=r"chats\.json, line 3: malformed JSON"):
        load_rows(Source(str(path)))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(UserError, match="empty.jsonl is empty"):
        load_rows(Source(str(path)))


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_samples_are_cut_or_dropped_and_counted(tmp_path, tokenizer, overlong):
    rows = gsm8k_chats(20)
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    full = prepared(tokenizer, [str(path)], max_length=4096)
    lengths = full.train_samples["length"]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the samples are longer
    longer = sum(length > limit for length in lengths)
    assert 0 < longer < len(rows)
    data = prepared(tokenizer, [str(path)], max_length=limit, overlong=overlong)
    if overlong == "truncate":
        assert len(data.train_samples) == len(rows)
        assert sum(1 for cut in data.train_samples["truncated"] if cut) == longer
        assert max(data.train_samples["length"]) == limit
    else:
        assert len(data.train_samples) == len(rows) - longer
        assert sum(data.dropped.values()) == longer
        assert all("longer than max_length" in reason for _, reason in data.dropped)


def test_parallel_tokenizing_gives_the_same_samples(tmp_path, tokenizer):
    rows = gsm8k_chats(40)  # two copies, so that the second run cannot be served from the first one's cache
    serial = prepared(tokenizer, [str(write_jsonl(tmp_path / "a.jsonl", rows))], max_length=512)
    parallel = prepared(tokenizer, [str(write_jsonl(tmp_path / "b.jsonl", rows))], max_length=512, num_proc=2)
    assert len(parallel.train_samples.cache_files) == 2  # really written by two processes
    assert serial.train_samples["input_ids"] == parallel.train_samples["input_ids"]
    assert serial.train_samples["labels"] == parallel.train_samples["labels"]
