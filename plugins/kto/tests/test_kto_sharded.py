"""KTO on two CPU processes, in one launch: Lightning's DDP (1 answer a micro-batch, 2 accumulated, on each rank),
DeepSpeed ZeRO-3 and FSDP (2 answers a micro-batch on each rank) each give the step losses and KL estimates of one
process training on the step's 4 answers in one micro-batch: the estimate is summed over micro-batches and ranks
before any loss is taken. The reference is another model, placed as the trained one is and never optimized."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from kto_rows import gsm8k_rows, labelled_data, write_jsonl
from kto_sharded_worker import kto

from lt_posttrain import MicroBatch

TESTS = Path(__file__).parent
STEPS, RANKS, LEARNING_RATE = 3, 2, 1e-3


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tokenizer):
    from lt_posttrain.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("other-llama"), tokenizer, seed=1)


def one_process(model_dir, reference_dir, dataset) -> tuple[list[float], list[float]]:
    """Each step's mean loss and KL estimate, its 4 answers in one micro-batch, trained in one process."""
    module = kto(str(model_dir), str(reference_dir), LEARNING_RATE)
    module.trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_progress_bar=False,
                               enable_checkpointing=False)  # fmt: skip
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    losses, kls = [], []
    for step in range(STEPS):
        batch = dataset[MicroBatch(tuple((index,) for index in range(4 * step, 4 * step + 4)), 4, 4)]
        answer_losses, _, kl = module.answer_losses(batch, training=False)  # the micro-batch is the step
        loss = answer_losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        kls.append(float(kl))
    return losses, kls


def test_ddp_zero3_and_fsdp_give_the_losses_of_one_process(tiny_model_dir, other_model_dir, tokenizer, tmp_path):
    pytest.importorskip("deepspeed")
    rows = write_jsonl(tmp_path / "rows.jsonl", gsm8k_rows(STEPS * 4))
    data = labelled_data(tokenizer, rows)
    dataset = data.batch_dataset(data.train_samples)
    batches = []  # step s, rank r: answers 4s + 2r and 4s + 2r + 1, the step's mismatched pairs over all four
    for step in range(STEPS):
        step_packs = tuple((index,) for index in range(4 * step, 4 * step + 4))
        for rank in range(RANKS):
            packs = step_packs[2 * rank : 2 * rank + 2]
            batches.append(dataset[MicroBatch(packs, 2, 2, step_packs, (packs,))])
    torch.save(batches, tmp_path / "batches.pt")
    losses, kls = one_process(tiny_model_dir, other_model_dir, dataset)
    assert max(kls) > 0.01 and losses[-1] < losses[0]

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
               str(TESTS / "kto_sharded_worker.py"), str(tiny_model_dir), str(other_model_dir), str(rows),
               str(tmp_path / "batches.pt"), str(LEARNING_RATE), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(RANKS)]
    for strategy in ("ddp", "deepspeed", "fsdp"):
        ours = [report[strategy] for report in reports]
        assert ours[1]["losses"] == pytest.approx(ours[0]["losses"], rel=1e-6), strategy  # every rank's mean
        assert ours[0]["losses"] == pytest.approx(losses, rel=1e-4), strategy
        # z0 sums ~300-nat float32 log-probabilities in another order: equal to a few of float32's spacings there
        assert ours[0]["kls"] == ours[1]["kls"] and ours[0]["kls"] == pytest.approx(kls, abs=1e-4), strategy
    for strategy, runs_in in (("deepspeed", "DeepSpeedEngine"), ("fsdp", "FullyShardedDataParallel")):
        assert all(report[strategy]["optimized"] == 0 and report[strategy]["runs_in"] == runs_in for report in reports)
