"""Data parallelism on CPU ranks (gloo), through the command line with ``configs/sft.yaml`` (its model, data and
hardware overridden): each rank trains on its own shard of every step, the steps' losses are those of one process
with the whole step's micro-batch, and only rank 0 writes the logs and the Hugging Face export. Eight processes
started by ``--trainer.devices 8``, and two nodes started by ``torchrun --nnodes 2``; two ranks on a streamed source
read distinct parts of it."""

import csv
import json
from itertools import combinations
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli_runs import fit, fit_on_nodes, logged_losses
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import InstructDataModule

STEPS = 3
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def sft_recipe_args(root: Path, audit: Path, model_dir: Path, data: Path, batch_size: int) -> list:
    """``configs/sft.yaml`` on CPU with a tiny model: ``STEPS`` optimizer steps of ``batch_size`` samples per rank,
    logs and export under ``root``, and each rank's :class:`rank_audit.RankAudit` report in ``audit``."""
    return [
        "--config", CONFIGS / "sft.yaml", "--model.name_or_path", model_dir, "--model.dtype", "float32",
        "--model.learning_rate", "1e-3", "--model.gradient_checkpointing", "false", "--data.sources", f"[{data}]",
        "--data.val_sources", "null", "--data.max_length", "512", "--data.batch_size", batch_size,
        "--data.packing", "false", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
        "--trainer.precision", "32-true", "--trainer.max_steps", STEPS, "--trainer.log_every_n_steps", "1",
        "--trainer.val_check_interval", "null", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", root, "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", root / "logs",
        "--checkpoint.output_dir", root / "export", "--throughput.enabled", "false",
        "--trainer.callbacks+=rank_audit.RankAudit", f"--trainer.callbacks.watch={root}",
        f"--trainer.callbacks.out={audit}",
    ]  # fmt: skip


def audit_reports(audit: Path) -> dict:
    return {int(path.stem.split("-")[1]): json.loads(path.read_text()) for path in audit.glob("rank-*.json")}


def one_process(tmp_path: Path, model_dir: Path, data: Path, batch_size: int) -> tuple[Path, dict]:
    root, audit = tmp_path / "one", tmp_path / "one-audit"
    fit(tmp_path, *sft_recipe_args(root, audit, model_dir, data, batch_size), "--trainer.devices", "1",
        "--trainer.strategy", "auto")  # fmt: skip
    return root, audit_reports(audit)


def assert_ranks_share_out_the_steps_of_one_process(ranks: dict, one: dict, world_size: int) -> None:
    """Each rank trained one sample a step, a different one each time and never one another rank had; together,
    at each step, the samples of the one process's micro-batch of that step."""
    assert sorted(ranks) == list(range(world_size))
    shards = [{tuple(sample) for step in ranks[rank]["steps"] for sample in step} for rank in range(world_size)]
    assert all(len(shard) == STEPS for shard in shards)
    assert all(not a & b for a, b in combinations(shards, 2))
    for step in range(STEPS):
        together = sorted(tuple(ranks[rank]["steps"][step][0]) for rank in range(world_size))
        assert together == sorted(tuple(sample) for sample in one[0]["steps"][step])


def assert_only_rank_zero_wrote(ranks: dict, root: Path) -> None:
    written = ranks[0]["writes"]  # rank 0 wrote the log and the export (so the audit sees such writes)...
    assert any(path.endswith("metrics.csv") for path in written)
    assert any(Path(path).parent == (root / "export").resolve() for path in written)
    for rank in sorted(ranks)[1:]:  # ...and no other rank wrote anything under the run folder
        assert ranks[rank]["writes"] == [], f"rank {rank} wrote {ranks[rank]['writes'][:5]}"


@pytest.mark.slow
def test_eight_cpu_ranks_shard_the_data_match_one_process_and_leave_writing_to_rank_zero(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(8 * STEPS))
    one_root, one = one_process(tmp_path, tiny_model_dir, data, batch_size=8)
    root, audit = tmp_path / "eight", tmp_path / "eight-audit"
    fit(tmp_path, *sft_recipe_args(root, audit, tiny_model_dir, data, batch_size=1), "--trainer.devices", "8",
        "--trainer.strategy", "ddp")  # fmt: skip
    eight = audit_reports(audit)

    assert_ranks_share_out_the_steps_of_one_process(eight, one, world_size=8)
    losses = logged_losses(root / "logs")
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert losses == pytest.approx(logged_losses(one_root / "logs"), rel=1e-5)
    assert_only_rank_zero_wrote(eight, root)


def test_two_torchrun_nodes_match_one_process(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(2 * STEPS))
    one_root, one = one_process(tmp_path, tiny_model_dir, data, batch_size=2)
    root, audit = tmp_path / "nodes", tmp_path / "nodes-audit"
    fit_on_nodes(tmp_path, 2, *sft_recipe_args(root, audit, tiny_model_dir, data, batch_size=1),
                 "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp")  # fmt: skip
    nodes = audit_reports(audit)

    assert_ranks_share_out_the_steps_of_one_process(nodes, one, world_size=2)
    assert logged_losses(root / "logs") == pytest.approx(logged_losses(one_root / "logs"), rel=1e-5)
    assert_only_rank_zero_wrote(nodes, root)


def test_two_ranks_read_and_train_on_distinct_parts_of_a_stream(tiny_model_dir, tokenizer, tmp_path):
    """Two gloo ranks on a streamed, packed source: each trains on exactly the samples of its own part of the file
    (computed here from that rank's part alone), none of the other's, and the checkpoint holds both positions. The
    same launch answers three validation prompts (two on rank 0, one on rank 1): rank 0 alone writes the table, whose
    answers are transformers' greedy ones from the exported weights."""
    data = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(40))
    validation = write_jsonl(tmp_path / "validation.jsonl", gsm8k_chats(3, start=100))
    source = {"name_or_path": str(data), "streaming": True}
    root, audit = tmp_path / "stream", tmp_path / "stream-audit"
    fit(tmp_path, *sft_recipe_args(root, audit, tiny_model_dir, data, batch_size=1), "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--data.sources", json.dumps([source]), "--data.packing", "true",
        "--data.packing_buffer", "4", "--trainer.enable_checkpointing", "true",
        "--data.val_sources", f"[{validation}]", "--trainer.val_check_interval", STEPS,
        "--trainer.num_sanity_val_steps", "0", "--validation_answers.num_prompts", "3",
        "--validation_answers.max_new_tokens", "6", "--validation_answers.batch_size", "1")  # fmt: skip
    ranks = audit_reports(audit)

    shards = [{tuple(sample) for step in ranks[rank]["steps"] for sample in step} for rank in (0, 1)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    module = InstructDataModule([source], max_length=512, batch_size=1, packing=True, packing_buffer=4)
    module.connect(tokenizer)
    module.setup("fit")
    for rank in (0, 1):
        reader = iter(module.stream_micro_batches(rank, 2, steps=STEPS))
        expected = []
        for _ in range(STEPS):
            batch = next(reader)
            row, bounds = batch["input_ids"][0].tolist(), batch["cu_seq_lens_q"].tolist()
            expected.append([row[start:end] for start, end in zip(bounds, bounds[1:])])
        assert ranks[rank]["steps"] == expected, rank
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    (loader,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert len(loader["ranks"]) == 2 and loader["ranks"][0] != loader["ranks"][1]

    (table,) = (root / "logs").rglob("validation_answers.csv")
    assert [path for rank in (0, 1) for path in ranks[rank]["writes"] if path.endswith(table.name)] == [
        str(table.resolve())
    ] and not any(path.endswith(table.name) for path in ranks[1]["writes"])
    with open(table) as file:
        rows = list(csv.DictReader(file))
    assert [(row["step"], row["index"]) for row in rows] == [(str(STEPS), str(index)) for index in range(3)]
    assert [row["reference"] for row in rows] == [chat["messages"][1]["content"] for chat in gsm8k_chats(3, 100)]
    model = AutoModelForCausalLM.from_pretrained(root / "export", dtype=torch.float32).eval()
    answers = []
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=2)
            answer = out[0, len(prompt) :].tolist()
            answers.append(tokenizer.decode(answer[: answer.index(2)] if 2 in answer else answer))
    assert [row["answer"] for row in rows] == answers
