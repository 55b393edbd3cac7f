"""DPO on two CPU processes, in one launch: Lightning's DDP with the reference precomputed (each rank scores its share,
then frees it), DeepSpeed ZeRO-3 and FSDP with a live reference created sharded (no rank holds it whole) and kept out
of the optimizer and the state dict: the loss starts at log 2, and the steps' losses are those of the same steps in
one process with the live reference."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from dpo_rows import gsm8k_pairs, write_jsonl
from lt_posttrain_dpo import DPOModule, PreferenceDataModule

TESTS = Path(__file__).parent
STEPS, RANKS, LEARNING_RATE = 3, 2, 1e-3


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", gsm8k_pairs(STEPS * RANKS * 2))


@pytest.fixture(scope="module")
def micro_batches(tokenizer, pairs_file) -> list[dict]:
    """``STEPS * RANKS`` micro-batches of 2 pairs each: step ``s`` holds the pairs ``4s`` to ``4s + 3``, as a DDP step
    of 1 pair a micro-batch, 2 accumulated on each of 2 ranks does."""
    data = PreferenceDataModule([{"name_or_path": str(pairs_file), "type": "preference_pairs"}], max_length=512,
                                batch_size=2, shuffle=False)  # fmt: skip
    data.connect(tokenizer)
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert len(batches) == STEPS * RANKS and all(int(batch["loss_count"]) == 2 for batch in batches)
    return batches


@pytest.fixture(scope="module")
def unsharded_losses(tiny_model_dir, micro_batches) -> list[float]:
    """Each step's mean loss over the pairs of its ``RANKS`` micro-batches, trained in one process."""
    module = DPOModule(str(tiny_model_dir), beta=0.5, learning_rate=LEARNING_RATE)
    module.trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_progress_bar=False,
                               enable_checkpointing=False)  # fmt: skip
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for step in range(STEPS):
        batches = micro_batches[step * RANKS : (step + 1) * RANKS]
        loss = torch.cat([module.pair_losses(batch)[0] for batch in batches]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def check_losses(losses: list[list[float]], unsharded_losses: list[float]) -> None:
    """Every rank logged the same step losses, those of one process; the first is log 2 (the model is its
    reference)."""
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert losses[0][0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[0] == pytest.approx(unsharded_losses, rel=1e-4)


def test_ddp_zero3_and_fsdp_give_the_losses_of_one_process(tiny_model_dir, pairs_file, micro_batches,
                                                          unsharded_losses, tmp_path):  # fmt: skip
    from transformers import AutoModelForCausalLM

    pytest.importorskip("deepspeed")
    torch.save(micro_batches, tmp_path / "batches.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
               str(TESTS / "dpo_sharded_worker.py"), str(tiny_model_dir), str(pairs_file), str(tmp_path / "batches.pt"),
               str(LEARNING_RATE), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(RANKS)]

    # DDP, the reference precomputed: never held during a step
    check_losses([report["ddp"]["losses"] for report in reports], unsharded_losses)
    assert not any(held for report in reports for held in report["ddp"]["held"])

    for name in ("deepspeed", "fsdp"):
        for report in reports:
            held = report[name]
            assert held["optimized"] == 0 and held["saved"] == [] and held["saved_count"] > 0
        check_losses([report[name]["losses"] for report in reports], unsharded_losses)

    # ZeRO-3: the reference partitioned as created and after the steps
    for report in (report["deepspeed"] for report in reports):
        for sizes in (report["created"], report["after"]):  # [full size, partition, held whole, dtype] per weight
            assert len(sizes) == len(reports[0]["deepspeed"]["created"]) > 0
            for full, partition, _, dtype in sizes.values():  # each rank has a partition of every weight
                assert partition < full <= RANKS * partition and dtype == "torch.float32"
        assert all(held == 0 for _, _, held, _ in report["created"].values())  # created without a whole weight
        # After the steps DeepSpeed keeps weights under its persistence threshold gathered; the others it releases.
        assert max(report["after"].values())[2] == 0
        assert report["runs_in"] == "DeepSpeedEngine"

    # FSDP: each rank holds its shard of the reference only
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    for sizes in ("created", "after"):
        held = [report["fsdp"][sizes]["held"] for report in reports]
        assert sum(held) == full and max(held) < full
        assert all(report["fsdp"][sizes]["dtypes"] == ["torch.float32"] for report in reports)
    assert all(report["fsdp"]["runs_in"] == "FullyShardedDataParallel" for report in reports)
