"""Gradient accumulation under DeepSpeed, through Lightning's own training loop on two CPU ranks (gloo): ZeRO-2 and
ZeRO-3 with one-sample micro-batches accumulated over 2 train as one process with each whole step in one micro-batch
does, the epoch's shorter last step included, and every optimizer step is counted and seen once."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_runs import logged_losses
from conftest import gsm8k_chats, write_jsonl
from deepspeed_accumulation_worker import train

TESTS = Path(__file__).parent
STEPS = 4  # two epochs of 6 samples, each a step of 4 samples and one of 2
STAGES = (2, 3)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed: pip install '.[deepspeed]'")
def test_accumulation_under_deepspeed_trains_as_one_process(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(6))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "deepspeed_accumulation_worker.py"), str(tiny_model_dir), str(data), str(tmp_path / "ds"),
               str(STEPS), *map(str, STAGES)]  # fmt: skip
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    weights, one = train(tiny_model_dir, data, tmp_path / "one", "auto", devices=1, batch_size=4, accumulate=1,
                         steps=STEPS)  # fmt: skip
    losses = logged_losses(tmp_path / "one")
    assert one["global_step"] == STEPS and len(losses) == STEPS and losses[-1] < losses[0]
    assert len({step["lr"] for step in one["steps"]}) == STEPS  # the schedule moves at every step
    for stage in STAGES:
        out = tmp_path / "ds" / f"stage-{stage}"
        for rank in (0, 1):  # the hooks once per optimizer step, at the global step and learning rate of one process
            assert json.loads((out / f"steps-{rank}.json").read_text()) == one, f"ZeRO-{stage}, rank {rank}"
        assert logged_losses(out) == pytest.approx(losses, rel=1e-5), f"ZeRO-{stage}"
        trained = torch.load(out / "weights.pt")
        assert trained.keys() == weights.keys()
        for name in weights:  # an update moves a weight by up to ~1e-3 here
            torch.testing.assert_close(trained[name], weights[name], rtol=0, atol=3e-5, msg=f"ZeRO-{stage}: {name}")
