"""``lt-posttrain data prepare`` and ``data preview``: a recipe's data tokenized, counted and shown without the model;
and ``sample_stats``, the counting, on its own."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_runs import command_here
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain.data.stats import percentile, sample_stats
from lt_posttrain.data.tokenize import count_loss_tokens, tokenize_conversation
from test_cli import assert_one_line_error


@pytest.fixture
def lt_posttrain(capsys):
    """``lt_posttrain(*args)``: the command in this process (:func:`cli_runs.command_here`); ``fit`` reusing what
    ``prepare`` cached runs in processes of its own."""
    return lambda *args: command_here(capsys, *args)

MAX_LENGTH = 128  # cuts most GSM8K chats and leaves no answer token in a few (prompts of 137+ tokens)
NO_ANSWER = {"messages": [{"role": "user", "content": "A question nobody answers."}]}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """24 GSM8K chats and two rows without an assistant turn (first, and in the middle)."""
    chats = gsm8k_chats(24)
    return [NO_ANSWER, *chats[:10], NO_ANSWER, *chats[10:]]


@pytest.fixture(scope="module")
def chats_file(tmp_path_factory, rows) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data-commands") / "chats.jsonl", rows)


def recipe(path: Path, model: dict, data: dict) -> Path:
    """A ``fit`` recipe, with the sections ``data`` commands do not use."""
    trainer = {"accelerator": "cpu", "max_steps": 2, "default_root_dir": str(path.parent)}
    path.write_text(yaml.safe_dump({"seed_everything": 0, "model": model, "data": data, "trainer": trainer,
                                    "checkpoint": {"save_end_of_training": False}}))  # fmt: skip
    return path


def expected_counts(rows: list[dict], tokenizer, max_length: int) -> dict:
    """The numbers ``prepare`` must print, from the chat template's own tokenization of each whole conversation and
    of its prompt (not from the data module's code)."""

    def ids(messages, **kwargs) -> list[int]:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
        return list(encoded if isinstance(encoded, list) else encoded["input_ids"])

    counts = {"rows": len(rows), "samples": 0, "dropped": 0, "truncated": 0, "tokens": 0, "loss_tokens": 0, "max": 0}
    for row in rows:
        messages = row["messages"]
        if messages[-1]["role"] != "assistant":
            counts["dropped"] += 1
            continue
        full = len(ids(messages))  # ends with "<|im_end|>\n"; the newline carries no loss
        prompt = len(ids(messages[:-1], add_generation_prompt=True))  # the answer starts at this token
        if prompt >= max_length:
            counts["dropped"] += 1
            continue
        counts["samples"] += 1
        counts["truncated"] += full > max_length
        counts["tokens"] += min(full, max_length)
        counts["loss_tokens"] += min(full - 1, max_length) - prompt
        counts["max"] = max(counts["max"], min(full, max_length))
    return counts


# -- sample_stats --------------------------------------------------------------------------------------------------
def test_sample_stats_of_columns():
    lengths, loss_counts, truncated = [5, 1, 3, 10, 7], [2, 0, 1, 6, 3], [0, 0, 0, 4, 0]
    stats = sample_stats({"length": lengths, "loss_count": loss_counts, "truncated": truncated}, rows=9, held_out=1)
    assert stats == {
        "rows": 9, "held_out": 1, "samples": 5, "dropped": 3, "truncated": 1, "truncated_tokens": 4, "tokens": 26,
        "loss_tokens": 12, "loss_share": 12 / 26, "length": {"p50": 5, "p90": 10, "p99": 10, "max": 10},
    }  # fmt: skip
    assert sample_stats({"length": lengths, "loss_count": loss_counts, "truncated": truncated}, 9, 1, 0)["dropped"] == 0
    assert sample_stats({"length": lengths, "loss_count": loss_counts, "truncated": truncated})["dropped"] is None


def test_sample_stats_of_a_dataset_with_input_ids_only():
    import datasets

    lengths = [3, 8, 8, 2, 9, 4, 4, 1, 6, 7, 5]
    samples = datasets.Dataset.from_dict({
        "input_ids": [[1] * n for n in lengths], "loss_count": [n // 2 for n in lengths], "truncated": [0] * 11,
    })  # fmt: skip
    stats = sample_stats(samples)
    ordered = sorted(lengths)
    for p in (50, 90, 99):  # nearest rank: the smallest length with at least p % of the samples at or below it
        assert stats["length"][f"p{p}"] == ordered[math.ceil(p / 100 * len(ordered)) - 1]
    assert stats["length"] == {"p50": 5, "p90": 8, "p99": 9, "max": 9}
    assert (stats["samples"], stats["tokens"], stats["loss_tokens"], stats["truncated"]) == (11, 57, 26, 0)
    empty = sample_stats({"length": [], "loss_count": [], "truncated": []})
    assert empty["length"] == {"p50": 0, "p90": 0, "p99": 0, "max": 0} and empty["loss_share"] == 0.0
    assert percentile([4], 1) == 4 and percentile([], 50) == 0


# -- prepare -------------------------------------------------------------------------------------------------------
def test_prepare_json_counts_every_row(tiny_model_dir, chats_file, rows, tokenizer, tmp_path, lt_posttrain):
    """Flat sections as in configs/quickstart.yaml; ``--data.max_length`` and ``--data.val_fraction`` given on the
    command line win over the recipe."""
    config = recipe(tmp_path / "r.yaml", {"name_or_path": str(tiny_model_dir), "learning_rate": 1e-4},
                    {"sources": [str(chats_file)], "max_length": 2048, "packing": True})  # fmt: skip
    result = lt_posttrain("data", "prepare", "--config", config, "--format", "json",
                          "--data.max_length", MAX_LENGTH, "--data.val_fraction", "0.25")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    expected = expected_counts(rows, tokenizer, MAX_LENGTH)
    train, val = report["train"], report["validation"]
    assert report["max_length"] == MAX_LENGTH and report["packing"] is True
    assert train["rows"] == expected["rows"] == 26
    assert train["dropped"] == expected["dropped"] >= 3  # the two rows without an answer, and long prompts
    assert train["samples"] + val["samples"] == expected["samples"]
    assert train["held_out"] == val["samples"] == math.ceil(0.25 * expected["samples"])
    assert train["rows"] == train["samples"] + train["held_out"] + train["dropped"]
    assert sum(train["dropped_reasons"].values()) == train["dropped"]
    for key in ("truncated", "tokens", "loss_tokens"):
        assert train[key] + val[key] == expected[key], key
    assert expected["truncated"] > 0
    assert max(train["length"]["max"], val["length"]["max"]) == expected["max"] == MAX_LENGTH
    assert train["loss_share"] == pytest.approx(train["loss_tokens"] / train["tokens"])
    assert 0 < train["packed_rows"] <= train["samples"]


def test_prepare_table_with_class_path_sections(tiny_model_dir, chats_file, rows, tokenizer, tmp_path,
                                                 lt_posttrain):
    """``class_path``/``init_args`` sections as ``fit --print_config`` writes them; ``--data.sources`` replaces the
    recipe's (missing) file."""
    config = recipe(
        tmp_path / "r.yaml",
        {"class_path": "lt_posttrain.SFTModule", "init_args": {"name_or_path": str(tiny_model_dir)}},
        {"class_path": "lt_posttrain.InstructDataModule",
         "init_args": {"sources": [str(tmp_path / "missing.jsonl")], "max_length": MAX_LENGTH}},
    )  # fmt: skip
    result = lt_posttrain("data", "prepare", "--config", config, "--data.sources", f"[{chats_file}]")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = expected_counts(rows, tokenizer, MAX_LENGTH)
    train = next(line for line in result.stdout.splitlines() if line.startswith("train "))
    share = f"{100 * expected['loss_tokens'] / expected['tokens']:.1f}%"
    # rows, held out, samples, dropped, truncated, tokens, loss tokens, loss share, p50, p90, p99, max
    values = [expected[key] for key in ("rows", "samples", "dropped", "truncated", "tokens", "loss_tokens")]
    assert train.split()[1:9] == [str(values[0]), "0", *map(str, values[1:]), share]
    assert train.split()[-1] == str(expected["max"])
    assert "No validation data" in result.stdout


def test_fit_reuses_what_prepare_tokenized(tiny_model_dir, chats_file, tmp_path):
    config = recipe(tmp_path / "r.yaml", {"name_or_path": str(tiny_model_dir)},
                    {"sources": [str(chats_file)], "max_length": MAX_LENGTH, "val_fraction": 0.25})  # fmt: skip
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}

    def run(*args):
        command = [sys.executable, "-m", "lt_posttrain.cli", *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)

    def cache_files() -> dict:
        return {path: path.stat().st_mtime_ns for path in (tmp_path / "datasets-cache").rglob("*.arrow")}

    prepared = run("data", "prepare", "--config", config)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    tokenized = cache_files()
    assert any("cache-" in path.name for path in tokenized)  # the tokenized samples
    validated = run("validate", "--config", config)
    assert validated.returncode == 0, validated.stderr[-2000:]
    assert "val/loss" in validated.stdout
    assert cache_files() == tokenized  # the samples came from the cache: nothing tokenized or written again


# -- preview -------------------------------------------------------------------------------------------------------
def test_preview_json_is_the_tokenized_first_rows(tiny_model_dir, chats_file, rows, tokenizer, tmp_path,
                                                  lt_posttrain):
    config = recipe(tmp_path / "r.yaml", {"name_or_path": str(tiny_model_dir)},
                    {"sources": [str(chats_file)], "max_length": MAX_LENGTH, "val_fraction": 0.25})  # fmt: skip
    result = lt_posttrain("data", "preview", "--config", config, "--num", 12, "--format", "json")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    expected = [
        (row["messages"], sample)
        for row in rows
        for sample in tokenize_conversation(row["messages"], tokenizer, MAX_LENGTH)
        if count_loss_tokens(sample["labels"])
    ][:12]
    assert len(records) == 12
    for record, (messages, sample) in zip(records, expected):
        assert set(record) == {"messages", "input_ids", "labels"}
        assert record["messages"] == messages
        assert record["input_ids"] == sample["input_ids"] and record["labels"] == sample["labels"]
    assert any(len(record["input_ids"]) == MAX_LENGTH for record in records)  # cut samples are shown as trained


def test_preview_text_shows_the_conversation(tiny_model_dir, chats_file, rows, tmp_path, lt_posttrain):
    config = recipe(tmp_path / "r.yaml", {"name_or_path": str(tiny_model_dir)}, {"sources": [str(chats_file)]})
    result = lt_posttrain("data", "preview", "--config", config, "--num", 2)
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = rows[1]["messages"], rows[2]["messages"]  # rows[0] has no answer: it gives no sample
    for messages in (first, second):
        assert messages[0]["content"] in result.stdout and messages[1]["content"] in result.stdout
    assert "sample 0:" in result.stdout and "sample 1:" in result.stdout and "sample 2:" not in result.stdout
    assert "<|im_start|>assistant" in result.stdout
    # not a terminal, so no colour: the tokens that carry loss are marked, each answer and its end-of-turn token
    assert result.stdout.count("\u27e6") == 3 and "\u27e6tokens that carry loss\u27e7" in result.stdout  # legend, 2 answers
    for messages in (first, second):
        assert f"\u27e6{messages[1]['content']}<|im_end|>\u27e7" in result.stdout
    assert lt_posttrain("data", "preview", "--config", config, "--num", 0).returncode == 0


def test_token_pieces_add_up_to_the_text(tokenizer):
    from lt_posttrain.cli.data import token_pieces

    text = "Héllo 世界 🎉🎉 naïve — ok<|im_end|>\n  x"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(ids, tokenizer)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "" in pieces  # a character spread over tokens comes out whole, with the token that completes it


def test_help(lt_posttrain):
    result = lt_posttrain("data", "preview", "--help")
    assert result.returncode == 0 and "--num" in result.stdout and "--format" in result.stdout
    result = lt_posttrain("data", "--help")
    assert result.returncode == 0 and "prepare" in result.stdout and "preview" in result.stdout
    assert "data {prepare,preview}" in lt_posttrain("--help").stdout


# -- bad input -----------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line(tiny_model_dir, chats_file, tmp_path, lt_posttrain):
    missing = tmp_path / "none.yaml"
    assert_one_line_error(lt_posttrain("data", "prepare", "--config", missing), "none.yaml", "does not exist")
    bad_key = recipe(tmp_path / "bad.yaml", {"name_or_path": str(tiny_model_dir)},
                     {"sources": [str(chats_file)], "max_lenght": 64})  # fmt: skip
    assert_one_line_error(lt_posttrain("data", "preview", "--config", bad_key), "data.max_lenght", "data.max_length")
    good = recipe(tmp_path / "good.yaml", {"name_or_path": str(tiny_model_dir)}, {"sources": [str(chats_file)]})
    missing_data = f"[{tmp_path / 'no.jsonl'}]"
    assert_one_line_error(lt_posttrain("data", "prepare", "--config", good, "--data.sources", missing_data),
                          "no.jsonl", "no such file")  # fmt: skip
    assert_one_line_error(lt_posttrain("data", "prepare", "--config", good, "--formt", "json"), "formt", "format")
    assert_one_line_error(lt_posttrain("data", "preview", "--config", good, "--num", "-1"), "--num")
    assert_one_line_error(lt_posttrain("data", "preview", "--data.sources", f"[{chats_file}]"), "model.name_or_path")
    assert_one_line_error(lt_posttrain("data", "prepar", "--config", good), "prepar")


def test_data_commands_accept_every_section_of_a_fit_recipe(tiny_model_dir, chats_file, lt_posttrain):
    """A recipe that ``fit`` accepts is a recipe ``data prepare`` and ``data preview`` accept."""
    import inspect

    from lt_posttrain.cli.data import prepare, preview

    result = lt_posttrain("fit", "--model.name_or_path", tiny_model_dir, "--data.sources", f"[{chats_file}]", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    sections = set(yaml.safe_load(result.stdout)) - {"format"}
    for command in (prepare, preview):
        assert sections <= set(inspect.signature(command).parameters), sections - set(inspect.signature(command).parameters)
