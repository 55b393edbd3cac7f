"""Resuming under DeepSpeed ZeRO-3, through Lightning's own loop on two CPU ranks (gloo): the checkpoints
``TrainingStateCheckpoint`` writes are DeepSpeed's sharded folders, ``ckpt_path="last"`` finds the newest, and the
resumed run logs the losses and ends with the weights of a run never stopped."""

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
from lt_posttrain.callbacks.training_state import checkpoint_states_file

TESTS = Path(__file__).parent
STEPS = 4  # two epochs of 6 samples, each a step of 4 samples and one of 2: stopped in the middle of the second
RUNS = ("uninterrupted", "stopped", "resumed")


def run_ranks(model_dir, data: Path, out: Path, finetune: str, *runs: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "sharded_resume_worker.py"), str(model_dir), str(data), str(out), str(STEPS), finetune,
               *runs]  # fmt: skip
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed: pip install '.[deepspeed]'")
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_zero3_resumed_from_last_trains_as_an_uninterrupted_run(finetune, tiny_model_dir, tmp_path):
    """A full fine-tune, and LoRA adapters (the frozen base is not in the checkpoint's optimizer partitions)."""
    data = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(6))
    run_ranks(tiny_model_dir, data, tmp_path, finetune, "uninterrupted", "stopped")

    folder = tmp_path / "interrupted" / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt", "step-2.ckpt", "step-3.ckpt"]
    assert os.readlink(folder / "last.ckpt") == "step-3.ckpt"
    shards = folder / "step-3.ckpt" / "checkpoint"
    for rank in (0, 1):  # each rank wrote its own partition of the weights' optimizer states
        assert (shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").stat().st_size > 0
    states = torch.load(checkpoint_states_file(folder / "last.ckpt"), weights_only=True, mmap=True)
    assert states["global_step"] == STEPS - 1  # what the command line reads from a folder: its states file
    assert (states["hyper_parameters"]["lora"] is not None) == (finetune == "lora")

    run_ranks(tiny_model_dir, data, tmp_path, finetune, "resumed")
    losses = {run: logged_losses(tmp_path / run) for run in RUNS}
    assert [len(losses[run]) for run in RUNS] == [STEPS, STEPS - 1, 1]
    assert losses["stopped"] + losses["resumed"] == pytest.approx(losses["uninterrupted"], rel=1e-5)
    for rank in (0, 1):  # the resumed run's one step, at the global step and learning rate of the uninterrupted run
        [step] = json.loads((tmp_path / "resumed" / f"steps-{rank}.json").read_text())["steps"]
        assert step == json.loads((tmp_path / "uninterrupted" / f"steps-{rank}.json").read_text())["steps"][-1]
    weights = {run: torch.load(tmp_path / run / "weights.pt") for run in RUNS}
    expected, trained = weights["uninterrupted"], weights["resumed"]
    assert trained.keys() == expected.keys()
    assert any(not torch.equal(weights["stopped"][name], expected[name]) for name in expected)  # the last step moved
    for name in expected:
        torch.testing.assert_close(trained[name], expected[name], rtol=0, atol=1e-5, msg=name)
