"""Sequence parallelism (``model.sequence_parallel``): each rank of a group holds a part of every packed row, the
attention exchanges sequence parts for head parts (DeepSpeed's Ulysses over the varlen attention), and the losses and
gradients are those of one process with whole rows, over sequence and data parallelism together. Real CLI runs on
gloo ranks, against one process: sample boundaries fall inside the ranks' parts, so samples cross them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from cli_runs import failing_here, fit, logged_losses
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import IGNORE_INDEX, UserError
from lt_posttrain.data.collate import collate_packed
from lt_posttrain.training.sequence_parallel import check_heads, check_row_part, check_sequence_parallel, shard_row
from test_cli import assert_one_line_error
from test_loss_normalisation import assert_same_grads

STEPS = 3


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    """GSM8K chats of 150 to 400 tokens: packed four or so to a row of 1024 tokens."""
    return write_jsonl(tmp_path_factory.mktemp("sp-data") / "chats.jsonl", gsm8k_chats(24))


def fit_args(model_dir, data, root: Path, name: str, devices: int, sequence_parallel: int, batch_size: int) -> list:
    """A packed ``fit`` of ``STEPS`` steps on ``devices`` gloo ranks (one process when 1), the first step's
    gradients and each rank's parts of the rows (:class:`shard_audit.ShardAudit`) in ``root/name``."""
    return [
        f"--model.name_or_path={model_dir}", f"--data.sources=[{data}]", f"--data.batch_size={batch_size}",
        "--data.max_length=1024", "--data.packing=true", "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
        "--trainer.strategy=ddp" if devices > 1 else "--trainer.strategy=auto", f"--trainer.max_steps={STEPS}",
        f"--model.sequence_parallel={sequence_parallel}", "--model.learning_rate=1e-3",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--checkpoint.save_end_of_training=false", f"--trainer.default_root_dir={root / name}",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={root / name / 'logs'}",
        "--trainer.log_every_n_steps=1", "--throughput.enabled=false", "--trainer.callbacks+=shard_audit.ShardAudit",
        f"--trainer.callbacks.path={root / name / 'grads.pt'}", f"--trainer.callbacks.out={root / name / 'parts'}",
    ]  # fmt: skip


def run(tmp_path, model_dir, data, name, devices, sequence_parallel, batch_size, *extra) -> dict:
    fit(tmp_path, *fit_args(model_dir, data, tmp_path, name, devices, sequence_parallel, batch_size), *extra)
    folder = tmp_path / name
    parts = {int(path.stem.split("-")[1]): json.loads(path.read_text()) for path in (folder / "parts").glob("*.json")}
    return {"grads": torch.load(folder / "grads.pt"), "losses": logged_losses(folder / "logs"), "parts": parts}


def assert_samples_cross_the_parts(parts: dict, size: int) -> None:
    """Every rank of a group held a part of the same rows, and some sample of each row crossed a cut between parts."""
    for rank in range(0, len(parts), size):
        group = [parts[rank + member] for member in range(size)]
        assert all(len(entries) == len(group[0]) for entries in group)
        for entries in zip(*group):
            assert all(entry["bounds"] == entries[0]["bounds"] for entry in entries)
            bounds, part = entries[0]["bounds"], entries[0]["tokens"]
            assert bounds[-1] == part * size  # the row padded to a multiple of the ranks
            cuts = range(part, part * size, part)
            assert any(start < cut < end for cut in cuts for start, end in zip(bounds, bounds[1:])), bounds


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, chats) -> dict:
    """The reference: one process, two packed rows a step."""
    return run(tmp_path_factory.mktemp("sp-one"), tiny_model_dir, chats, "one", 1, 1, 2)


def assert_same_run(expected: dict, actual: dict) -> None:
    assert_same_grads(expected["grads"], actual["grads"], rtol=1e-6)  # of the first step
    assert len(expected["losses"]) == STEPS and expected["losses"][-1] < expected["losses"][0]
    assert actual["losses"] == pytest.approx(expected["losses"], rel=1e-6)


def test_two_ranks_share_every_row_and_match_one_process(one_process, tiny_model_dir, chats, tmp_path):
    two = run(tmp_path, tiny_model_dir, chats, "two", 2, 2, 2)
    assert_samples_cross_the_parts(two["parts"], 2)
    assert_same_run(one_process, two)


@pytest.mark.slow
def test_four_ranks_share_every_row_and_match_one_process(one_process, tiny_model_dir, chats, tmp_path):
    """Four ranks a row: the model's 2 key/value heads each replicated over two ranks."""
    four = run(tmp_path, tiny_model_dir, chats, "four", 4, 4, 2)
    assert_samples_cross_the_parts(four["parts"], 4)
    assert_same_run(one_process, four)


@pytest.mark.slow
def test_two_groups_of_two_with_the_long_context_options_match_one_process(one_process, tiny_model_dir, chats,
                                                                           tmp_path):  # fmt: skip
    """Sequence and data parallelism together (two groups of two ranks, one row each a step), with the tiled loss
    and MLP (per rank, over its part) and the checkpoint offload (the exchanges recomputed in the backward pass)."""
    options = ["--model.long_context.tiled_loss=true", "--model.long_context.tiled_mlp=true",
               "--model.long_context.offload_checkpoints=true", "--model.long_context.loss_tile_tokens=64",
               "--model.long_context.mlp_tile_tokens=32"]  # fmt: skip
    groups = run(tmp_path, tiny_model_dir, chats, "groups", 4, 2, 1, *options)
    assert_samples_cross_the_parts(groups["parts"], 2)
    assert groups["parts"][0] != groups["parts"][2]  # the two groups trained on different rows
    assert_same_run(one_process, groups)


def test_zero3_and_fsdp_with_the_long_context_options_give_the_losses_of_one_process(tiny_model_dir, tokenizer,
                                                                                     tmp_path):  # fmt: skip
    """Two ranks a row under DeepSpeed ZeRO-3 and FSDP (set up by hand: Lightning refuses both on a CPU), with every
    long-context option, one launch for both (``sequence_parallel_worker.py``): three steps' losses are those of one
    process with the whole rows and no option, so the first two steps' gradients were too."""
    pytest.importorskip("deepspeed")
    from lt_posttrain import SFTModule
    from lt_posttrain.data.tokenize import tokenize_conversation
    from lt_posttrain.training.optimizer import build_optimizer

    rows = [tokenize_conversation(row["messages"], tokenizer, 512)[0] for row in gsm8k_chats(3 * STEPS)]
    batches = [collate_packed(rows[3 * index : 3 * index + 3]) for index in range(STEPS)]
    for batch in batches:
        batch["loss_count"] = (batch["targets"] != IGNORE_INDEX).sum()
        bounds, half = batch["cu_seq_lens_q"].tolist(), -(-batch["input_ids"].shape[-1] // 2)
        assert any(start < half < end for start, end in zip(bounds, bounds[1:]))  # a sample crosses the cut
    torch.save(batches, tmp_path / "batches.pt")
    tests = Path(__file__).parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tests / "sequence_parallel_worker.py"), str(tiny_model_dir), str(tmp_path / "batches.pt"),
               str(tmp_path)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]

    module = SFTModule(str(tiny_model_dir), learning_rate=1e-3)
    module.configure_model()
    optimizer, losses = build_optimizer("adamw", module.model, 1e-3, 0.0), []
    for batch in batches:
        loss = module.loss(batch) / batch["loss_count"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name in ("deepspeed_stage_3", "fsdp"):
        assert reports[1][name] == reports[0][name], name
        assert reports[0][name] == pytest.approx(losses, rel=1e-5), name


# -- in this process --------------------------------------------------------------------------------------------------
def packed_batch(lengths: list[int]) -> dict:
    samples = []
    for number, length in enumerate(lengths):
        ids = [100 * (number + 1) + position for position in range(length)]
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX, *ids[1:]]})
    return collate_packed(samples)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_a_row_is_padded_to_the_ranks_and_cut_into_their_parts(size):
    batch = packed_batch([5, 7, 3])  # 15 tokens
    parts = [shard_row(batch, rank, size, pad_id=0) for rank in range(size)]
    padded = -(-15 // size) * size
    for key in ("input_ids", "targets", "position_ids"):
        whole = torch.cat([part[key] for part in parts], dim=-1)
        assert whole.shape[-1] == padded
        assert torch.equal(whole[..., :15], batch[key])  # the targets cut after their shift: edges stay right
    whole_targets = torch.cat([part["targets"] for part in parts], dim=-1)
    assert (whole_targets[..., 15:] == IGNORE_INDEX).all()
    for part in parts:
        assert part["cu_seq_lens_q"].tolist() == [0, 5, 12, 15, padded]  # the whole row's, with the padding sample
        assert part["num_samples"] == 3
        assert part["max_length_q"] == part["max_length_k"] == 7
    assert sum(int(part["num_tokens"]) for part in parts) == 15


def test_a_whole_row_is_not_taken_for_a_part():
    batch = packed_batch([5, 7, 4])
    check_row_part(shard_row(batch, 1, 2, pad_id=0), 2)
    with pytest.raises(UserError, match="not cut into the ranks' parts"):
        check_row_part(batch, 2)


@pytest.mark.parametrize(
    "heads,kv_heads,size,refused",
    [(4, 2, 2, None), (4, 2, 4, None), (8, 1, 4, None), (4, 2, 3, "4 attention heads"), (6, 3, 2, "3 key/value heads")],
)
def test_heads_split_over_the_ranks_or_are_refused(heads, kv_heads, size, refused):
    config = LlamaConfig(hidden_size=8 * heads, num_attention_heads=heads, num_key_value_heads=kv_heads)
    if refused is None:
        check_heads(config, size)
    else:
        with pytest.raises(UserError, match=refused):
            check_heads(config, size)


def test_what_cannot_run_is_refused():
    check_sequence_parallel(2, 4, "varlen", True)
    for args, message in [
        ((2, 3, "varlen", True), "does not divide the 3 ranks"),
        ((2, 4, "sdpa", True), "set model.attn_implementation varlen"),
        ((2, 4, "varlen", False), "set data.packing true"),
        ((2, 4, "varlen", True, False, "DPOModule"), "DPOModule has a loss of its own"),
        ((0, 4, "varlen", True), "1 (off) or more"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            check_sequence_parallel(*args)


def test_refusals_are_one_line_before_any_rank_starts(capsys, tiny_model_dir, chats, tmp_path):
    base = ["fit", f"--model.name_or_path={tiny_model_dir}", f"--data.sources=[{chats}]", "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}", "--data.packing=true"]  # fmt: skip
    result = failing_here(capsys, *base, "--trainer.devices=3", "--trainer.strategy=ddp", "--model.sequence_parallel=2")
    assert_one_line_error(result, "model.sequence_parallel 2 does not divide the 3 ranks")
    result = failing_here(capsys, *base, "--model.sequence_parallel=3")
    assert_one_line_error(result, "model.sequence_parallel 3: the model's 4 attention heads")
    result = failing_here(capsys, *base, "--trainer.devices=2", "--trainer.strategy=ddp",
                          "--model.sequence_parallel=2", "--data.packing=false")  # fmt: skip
    assert_one_line_error(result, "set data.packing true")
