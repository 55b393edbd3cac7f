"""The reward model on two CPU processes, in one launch: Lightning's DDP (1 pair a micro-batch, 2 accumulated, on each
rank), DeepSpeed ZeRO-3 and FSDP (2 pairs a micro-batch on each rank) each give the step losses of one process
training on the step's 4 pairs in one micro-batch; DDP's validation accuracy is the share over all the pairs, not one
rank's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from reward_rows import gsm8k_pairs, reward_data, write_jsonl
from reward_sharded_worker import StepLosses, reward

TESTS = Path(__file__).parent
STEPS, RANKS, LEARNING_RATE = 3, 2, 1e-3


def test_ddp_zero3_and_fsdp_give_the_losses_of_one_process(reward_model_dir, tokenizer, tmp_path):
    pytest.importorskip("deepspeed")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", gsm8k_pairs(STEPS * 4))
    batches = list(reward_data(tokenizer, pairs, batch_size=2).train_dataloader())
    assert len(batches) == STEPS * RANKS and all(int(batch["loss_count"]) == 2 for batch in batches)
    torch.save(batches, tmp_path / "batches.pt")

    one = StepLosses()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, callbacks=[one],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    module = reward(str(reward_model_dir), LEARNING_RATE)
    sources = [{"name_or_path": str(pairs), "type": "reward_pairs"}]
    data = reward_data(tokenizer, pairs, batch_size=4, val_sources=sources)
    trainer.fit(module, data)
    trainer.limit_val_batches = 1.0
    [metrics] = trainer.validate(module, data, verbose=False)
    assert len(one.losses) == STEPS

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
               str(TESTS / "reward_sharded_worker.py"), str(reward_model_dir), str(pairs),
               str(tmp_path / "batches.pt"), str(LEARNING_RATE), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(RANKS)]
    for strategy in ("ddp", "deepspeed", "fsdp"):
        ours = [report[strategy]["losses"] for report in reports]
        assert ours[1] == pytest.approx(ours[0], rel=1e-6), strategy  # every rank's mean
        assert ours[0] == pytest.approx(one.losses, rel=1e-4), strategy
    # 12 validation pairs, 6 a rank: the share over all 12, the one process's
    assert reports[0]["ddp"]["accuracy"] == reports[1]["ddp"]["accuracy"] == pytest.approx(metrics["val/accuracy"])
