"""Streamed sources (``streaming: true``): rows read as they come, each rank its own part; samples equal to a table's;
mixed by weight, packed in a bounded buffer, each step's loss-token count exact; a position that resumes exactly,
reading no row twice; bounded memory on a file of a gigabyte; and one line for what a stream cannot do."""

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from cli_runs import command_here, failing_here, fit_args, fit_in_own_process, logged, run_in_own_process, write_recipe
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import InstructDataModule, Source
from lt_posttrain.batch import IGNORE_INDEX
from lt_posttrain.cli import main
from lt_posttrain.data.dataset import RowConverter, tokenize_rows
from lt_posttrain.data.sources import load_rows
from lt_posttrain.data.streaming import StreamedSamples
from lt_posttrain.data.streams import DatasetsStream, JsonLinesStream, open_stream
from lt_posttrain.errors import UserError
from test_cli import assert_one_line_error

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIGKILL_STATUS = -9


def numbered_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows ``{"id": n, "text": ...}`` of varied lengths."""
    generator = random.Random(seed)
    return [{"id": n, "text": "x" * generator.randint(0, 120)} for n in range(count)]


def write_lines(path: Path, rows: list[dict], blank_every: int = 0, final_newline: bool = True) -> Path:
    lines = []
    for number, row in enumerate(rows):
        lines.append(json.dumps(row))
        if blank_every and number % blank_every == 0:
            lines.append("")
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""))
    return path


def ids_of(stream) -> list[int]:
    return [row["id"] for _, row in stream]


# ---------------------------------------------------------------- stage 1: rows, each rank its part


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_ranks_share_out_the_lines_of_several_files_by_bytes(tmp_path, world_size):
    rows = numbered_rows(90)
    files = [write_lines(tmp_path / "a.jsonl", rows[:40], blank_every=7),
             write_lines(tmp_path / "b.jsonl", rows[40:41]),
             write_lines(tmp_path / "c.jsonl", rows[41:], final_newline=False)]  # fmt: skip
    parts = [ids_of(JsonLinesStream("rows", [str(f) for f in files], rank, world_size)) for rank in range(world_size)]
    assert [n for part in parts for n in part] == list(range(90))  # each line once, every rank its own stretch
    assert all(parts) and max(map(len, parts)) - min(map(len, parts)) <= 90 // world_size


def test_a_json_lines_stream_resumes_at_its_byte_offset_and_reads_nothing_before_it(tmp_path):
    path = write_lines(tmp_path / "rows.jsonl", numbered_rows(50))
    stream = JsonLinesStream("rows", [str(path)])
    reader = iter(stream)
    assert [next(reader)[1]["id"] for _ in range(17)] == list(range(17))
    state = stream.state_dict()
    with open(path, "r+b") as file:  # what was read is gone: a re-read would fail on it
        file.write(b"#" * state["offset"])
    resumed = JsonLinesStream("rows", [str(path)])
    resumed.load_state_dict(state)
    assert ids_of(resumed) == list(range(17, 50))
    resumed.next_epoch()
    with pytest.raises(UserError, match=r"rows\.jsonl, the line at byte 0: malformed JSON"):
        next(iter(resumed))  # the next pass reads from the start


def test_a_datasets_stream_splits_by_node_and_resumes(tmp_path):
    """Local CSV files go through datasets' IterableDataset: split_dataset_by_node, and its state_dict."""
    rows = numbered_rows(40)
    for part in range(2):  # two files: whole shards per rank
        lines = ["id,text"] + [f"{row['id']},{row['text']}" for row in rows[part * 20 : (part + 1) * 20]]
        (tmp_path / f"part{part}.csv").write_text("\n".join(lines) + "\n")
    source = Source(str(tmp_path), streaming=True)
    parts = [ids_of(open_stream(source, rank, 2)) for rank in range(2)]
    assert isinstance(open_stream(source), DatasetsStream)
    assert sorted(parts[0] + parts[1]) == list(range(40)) and not set(parts[0]) & set(parts[1])
    stream = open_stream(source, 1, 2)
    reader = iter(stream)
    first = [next(reader)[1]["id"] for _ in range(7)]
    resumed = open_stream(source, 1, 2)
    resumed.load_state_dict(stream.state_dict())
    assert first + ids_of(resumed) == parts[1]


# ---------------------------------------------------------------- stages 2 and 3: the same samples as a table


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    """GSM8K chats and the masking example's chats (per-message train/weight fields), some rows weighted."""
    masked = [json.loads(line) for line in (CONFIGS / "data" / "masked_chats.jsonl").read_text().splitlines()]
    rows = [dict(row) for row in gsm8k_chats(12) + masked * 3]
    for number in range(0, len(rows), 4):
        rows[number]["weight"] = 0.5
    random.Random(0).shuffle(rows)
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", rows)


@pytest.mark.parametrize(
    "settings",
    [{}, {"mask": "field", "train_end_of_turn": False}, {"mask": "last_assistant"}, {"mask": "all_tokens"},
     {"type": "text", "name_or_path": str(CONFIGS / "data" / "notes.jsonl")}],
)  # fmt: skip
def test_streamed_samples_are_those_of_the_table(tokenizer, chats, settings):
    source = Source(**{"name_or_path": str(chats), **settings})
    table, _ = tokenize_rows(load_rows(source), source, tokenizer, 256, None)
    converter = RowConverter.of(source, tokenizer, 256, None)
    stream = StreamedSamples(open_stream(Source(**{**source.__dict__, "streaming": True})), converter)
    streamed = [stream.next_sample() for _ in range(len(table))]
    keys = ["input_ids", "labels", "loss_count"] + [k for k in ("weight", "token_weights") if k in table.column_names]
    assert [{key: sample[key] for key in keys} for sample in streamed] == [
        {key: row[key] for key in keys} for row in table
    ]
    assert stream.next_sample()["input_ids"] == table[0]["input_ids"]  # the next pass starts over


# ---------------------------------------------------------------- stage 4: mixed, packed, steps formed ahead


def streaming_data(chats: Path, tokenizer, **settings) -> InstructDataModule:
    settings = {"sources": [{"name_or_path": str(chats), "streaming": True}], "max_length": 320, "batch_size": 2,
                "packing": True, "packing_buffer": 8, **settings}  # fmt: skip
    data = InstructDataModule(**settings)
    data.connect(tokenizer)
    data.setup("fit")
    return data


def micro_batches(dataset, count: int) -> list[dict]:
    reader = iter(dataset)
    return [next(reader) for _ in range(count)]


def test_each_step_is_formed_before_it_runs_and_carries_its_loss_tokens(tokenizer, chats):
    data = streaming_data(chats, tokenizer)
    batches = micro_batches(data.stream_micro_batches(accumulate=3, steps=4), 12)
    for start in range(0, 12, 3):
        step = batches[start : start + 3]
        counts = [int((batch["targets"] != IGNORE_INDEX).sum()) for batch in step]
        assert [int(batch["loss_count"]) for batch in step] == counts
        assert {int(batch["step_loss_count"]) for batch in step} == {sum(counts)}
    for batch in batches:
        lengths = batch["cu_seq_lens_q"].diff()
        assert batch["input_ids"].shape[1] <= 2 * 320 and int(lengths.max()) <= 320


def test_packing_fills_rows_from_a_bounded_buffer(tokenizer, chats):
    """Every sample of the stream, in packs of at most max_length tokens, as full as best-fit makes them."""
    data = streaming_data(chats, tokenizer, batch_size=1, packing_buffer=16)
    dataset = data.stream_micro_batches(steps=8)
    packs = micro_batches(dataset, 8)
    assert all(batch["input_ids"].shape[1] <= 320 for batch in packs)
    fill = sum(batch["input_ids"].shape[1] for batch in packs[:-1]) / (320 * (len(packs) - 1))
    assert fill > 0.8
    assert len(dataset.packs.ready) < 16  # never more than the buffer's samples held


@pytest.mark.parametrize("taken", [1, 4, 5, 9])
def test_the_position_resumes_mid_buffer_and_mid_step(tokenizer, chats, taken):
    """State taken after any micro-batch (inside a step, with packs of the buffer waiting) continues exactly, with a
    table source mixed in; the state survives a weights-only checkpoint round trip."""
    sources = [{"name_or_path": str(chats), "streaming": True, "weight": 3}, {"name_or_path": str(chats)}]
    expected = micro_batches(streaming_data(chats, tokenizer, sources=sources).stream_micro_batches(accumulate=2), 14)
    before = streaming_data(chats, tokenizer, sources=sources).stream_micro_batches(accumulate=2)
    assert_same_batches(micro_batches(before, taken), expected[:taken])
    state = before.state_dict()
    after = streaming_data(chats, tokenizer, sources=sources).stream_micro_batches(accumulate=2)
    after.load_state_dict(weights_only_round_trip(state))
    assert_same_batches(micro_batches(after, 14 - taken), expected[taken:])


def weights_only_round_trip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_batches(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for one, other in zip(actual, expected):
        assert one.keys() == other.keys()
        for key in one:
            assert torch.equal(torch.as_tensor(one[key]), torch.as_tensor(other[key])), key


def test_sources_mix_by_weight(tokenizer, tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", gsm8k_chats(30))
    second = write_jsonl(tmp_path / "second.jsonl", gsm8k_chats(30, start=30))
    sources = [{"name_or_path": str(first), "streaming": True, "weight": 3}, {"name_or_path": str(second)}]
    data = streaming_data(first, tokenizer, sources=sources, packing=False, batch_size=1)
    mixed = data.stream_micro_batches(steps=400).packs.samples
    of_the_table = {tuple(row["input_ids"]) for row in data.train_tables[1]}
    streamed = [tuple(mixed.next_sample()["input_ids"]) not in of_the_table for _ in range(400)]
    assert 0.7 < sum(streamed) / len(streamed) < 0.8


# ---------------------------------------------------------------- one line for what a stream cannot do


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--trainer.max_steps", "-1"], ["trainer.max_steps is required", "is streamed"]),
        (["--data.val_fraction", "0.1"], ["data.val_fraction", "give data.val_sources"]),
        (["--data.static_shapes", "true"], ["data.static_shapes", "turn it off"]),
        (["--data.num_workers", "2"], ["data.num_workers", "must be 0 or 1"]),
        (["--data.sources", "[{name_or_path: CHATS, streaming: true, shuffle: true}]"], ["shuffle needs the whole"]),
        (["--data.sources", "[{name_or_path: CHATS, streaming: true, sample_count: 5}]"], ["sample_count does not"]),
        (["--data.val_sources", "[{name_or_path: CHATS, streaming: true}]"], ["needs sample_count"]),
    ],
)
def test_what_a_stream_cannot_do_is_one_line(capsys, tmp_path, tiny_model_dir, chats, args, fragments):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, chats, trainer={"max_steps": 2},
                          data={"sources": [{"name_or_path": str(chats), "streaming": True}]})  # fmt: skip
    args = [arg.replace("CHATS", str(chats)) for arg in args]
    result = failing_here(capsys, *fit_args(recipe, tmp_path, "run", *args))
    assert_one_line_error(result, *fragments)


def test_data_preview_reads_a_stream_and_prepare_refuses_it(capsys, tmp_path, tiny_model_dir, chats):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, chats, trainer={"max_steps": 2},
                          data={"sources": [{"name_or_path": str(chats), "streaming": True}]})  # fmt: skip
    result = command_here(capsys, "data", "preview", "--config", recipe, "--num", "2", "--format", "json")
    assert result.returncode == 0, result.stderr
    first = json.loads(chats.read_text().splitlines()[0])["messages"]
    shown = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(shown) == 2 and shown[0]["messages"] == first
    assert_one_line_error(failing_here(capsys, "data", "prepare", "--config", recipe), "is streamed", "data preview")


# ---------------------------------------------------------------- killed and resumed through the command line


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-llama-dropout")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def stream_offset(checkpoint: Path) -> int:
    """The byte offset of the streamed file in rank 0's position in ``checkpoint``."""
    state = torch.load(checkpoint, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    found = []

    def walk(value):
        if isinstance(value, dict):
            if {"part", "offset", "read"} <= value.keys():
                found.append(value["offset"])
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(state["ranks"][0])
    (offset,) = found
    return offset


def test_a_killed_streamed_run_resumes_with_the_losses_of_an_uninterrupted_one(tmp_path, dropout_model_dir, capsys):
    """A streamed source mixed with a table by weight, packing, accumulation, dropout and a streamed validation source;
    killed with SIGKILL mid-run and resumed from its last checkpoint (both read by a loader worker): the steps' losses
    are those of a run never stopped (read in the main process), and the resumed run reads no row of the stream before
    the checkpoint's position (those bytes are overwritten before it starts)."""
    stream = write_jsonl(tmp_path / "stream.jsonl", gsm8k_chats(120))
    table = write_jsonl(tmp_path / "table.jsonl", gsm8k_chats(10, start=200))
    validation = write_jsonl(tmp_path / "validation.jsonl", gsm8k_chats(4, start=300))
    data = {
        "sources": [{"name_or_path": str(stream), "streaming": True, "weight": 3}, {"name_or_path": str(table)}],
        "val_sources": [{"name_or_path": str(validation), "streaming": True, "sample_count": 2}],
        "packing_buffer": 6,
    }
    recipe = write_recipe(tmp_path / "recipe.yaml", dropout_model_dir, stream, model={"attn_implementation": "sdpa"},
                          data=data, trainer={"max_steps": 8, "val_check_interval": 4},
                          training_state={"every_n_steps": 1, "keep_last": 1})  # fmt: skip
    main(fit_args(recipe, tmp_path / "uninterrupted", "run", "--trainer.enable_checkpointing", "false"))
    expected = logged(tmp_path / "uninterrupted", "run")
    assert sorted(expected) == list(range(8)) and logged(tmp_path / "uninterrupted", "run", "val/loss")

    root = tmp_path / "interrupted"
    kill = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step=6"]
    worker = ["--data.num_workers", "1"]  # the stream read in a worker process gives the same micro-batches
    result = fit_in_own_process(recipe, root, "killed", *worker, *kill)
    assert result.returncode == SIGKILL_STATUS, result.stderr[-3000:]
    offset = stream_offset(root / "checkpoints" / "last.ckpt")
    assert 0 < offset < stream.stat().st_size / 2
    with open(stream, "r+b") as file:
        file.write(b"#" * offset)
    main(fit_args(recipe, root, "resumed", *worker, "--ckpt_path", "last"))
    resumed = logged(root, "resumed")
    assert min(resumed) == 5  # resumed from the checkpoint of step 5 (logged as 4)
    for name, losses in {"killed": logged(root, "killed"), "resumed": resumed}.items():
        assert losses == {step: expected[step] for step in losses}, name
    assert set(logged(root, "killed")) | set(resumed) == set(expected)

    result = failing_here(capsys, *fit_args(recipe, root, "other", "--ckpt_path", "last", "--data.batch_size", "2",
                                            "--trainer.max_steps", "9"))  # fmt: skip
    assert_one_line_error(result, "stream positions are for other data or settings", "data.batch_size 1, now 2")


# ---------------------------------------------------------------- a gigabyte, in bounded memory


def write_big_jsonl(path: Path, size: int) -> None:
    """At least ``size`` bytes of JSON Lines: one GSM8K chat repeated, each row with its own id."""
    body = json.dumps(gsm8k_chats(1)[0])[1:]  # the chat's fields after the opening brace
    rows, per_block = 0, 4096
    with open(path, "w") as file:
        while file.tell() < size:
            file.write("".join(f'{{"id": {rows + n}, {body}\n' for n in range(per_block)))
            rows += per_block


def test_a_gigabyte_stream_trains_in_bounded_memory_without_a_full_pass(tmp_path, tiny_model_dir):
    """Five steps on a 1 GB JSON Lines file: the run adds far less than the file's size to the process's resident
    memory, next to nothing while training, and the checkpoint's position shows that only the first rows were read."""
    big = tmp_path / "big.jsonl"
    write_big_jsonl(big, 2**30)
    try:
        report = tmp_path / "memory.json"
        recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, big, trainer={"max_steps": 5},
                              data={"sources": [{"name_or_path": str(big), "streaming": True}]},
                              training_state={"every_n_steps": 5})  # fmt: skip
        result = run_in_own_process(*fit_args(recipe, tmp_path, "run", "--trainer.callbacks+=peak_memory.PeakMemory",
                                              f"--trainer.callbacks.out={report}"))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        memory = json.loads(report.read_text())
        offset = stream_offset(tmp_path / "checkpoints" / "last.ckpt")
        assert offset < 2**20, offset  # read: well under a megabyte of the gigabyte
        # What the run adds (model, optimizer, a step's transient [tokens, vocab] logits and their gradients, the
        # buffers) measured 330 MB (610 MB on a loaded machine: the allocator's arenas), ~90 MB of it while training,
        # as much as with a 1 MB file: bounded by the buffers, never near the file's size.
        assert memory["peak"] - memory["before_run"] < 2**30, memory
        assert memory["grown_while_training"] < 2**28, memory
    finally:
        big.unlink()
