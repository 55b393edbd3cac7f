"""DPO with a sharded model, for real, on two CPU processes (DeepSpeed ZeRO-3, FSDP): the reference is created
sharded (no rank holds it whole) and stays out of the optimizer and the state dict, the loss starts at log 2, and the
steps' losses are those of the same steps unsharded in one process."""

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
def micro_batches(tokenizer, tmp_path_factory) -> list[dict]:
    """``STEPS * RANKS`` micro-batches of 2 pairs each."""
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", gsm8k_pairs(STEPS * RANKS * 2))
    data = PreferenceDataModule([{"name_or_path": str(path), "type": "preference_pairs"}], max_length=512,
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


def run_ranks(strategy: str, model_dir, micro_batches: list[dict], folder: Path) -> list[dict]:
    torch.save(micro_batches, folder / "batches.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
               str(TESTS / "dpo_sharded_worker.py"), strategy, str(model_dir), str(folder / "batches.pt"),
               str(LEARNING_RATE), str(folder)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((folder / f"rank-{rank}.json").read_text()) for rank in range(RANKS)]


def check_training(reports: list[dict], unsharded_losses: list[float]) -> None:
    for report in reports:
        assert report["optimized"] == 0 and report["saved"] == [] and report["saved_count"] > 0
        assert report["losses"] == reports[0]["losses"]
    losses = reports[0]["losses"]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the model is its reference
    assert losses == pytest.approx(unsharded_losses, rel=1e-4)


def test_zero3_partitions_the_reference(tiny_model_dir, micro_batches, unsharded_losses, tmp_path):
    pytest.importorskip("deepspeed")
    reports = run_ranks("deepspeed", tiny_model_dir, micro_batches, tmp_path)
    for report in reports:
        for sizes in (report["created"], report["after"]):  # [full size, partition, held whole, dtype] per weight
            assert len(sizes) == len(reports[0]["created"]) > 0
            for full, partition, _, dtype in sizes.values():  # each rank has a partition of every weight
                assert partition < full <= RANKS * partition and dtype == "torch.float32"
        assert all(held == 0 for _, _, held, _ in report["created"].values())  # created without a whole weight
        # After the steps DeepSpeed keeps weights under its persistence threshold gathered; the others it releases.
        assert max(report["after"].values())[2] == 0
        assert report["runs_in"] == "DeepSpeedEngine"
    check_training(reports, unsharded_losses)


def test_fsdp_shards_the_reference(tiny_model_dir, micro_batches, unsharded_losses, tmp_path):
    from transformers import AutoModelForCausalLM

    reports = run_ranks("fsdp", tiny_model_dir, micro_batches, tmp_path)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    for sizes in ("created", "after"):
        held = [report[sizes]["held"] for report in reports]
        assert sum(held) == full and max(held) < full  # each rank holds its shard only
        assert all(report[sizes]["dtypes"] == ["torch.float32"] for report in reports)
    assert all(report["runs_in"] == "FullyShardedDataParallel" for report in reports)
    check_training(reports, unsharded_losses)
