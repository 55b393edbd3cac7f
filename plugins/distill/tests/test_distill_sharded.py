"""Distillation on two CPU processes, in one launch: Lightning's DDP (1 chat a micro-batch, 2 accumulated, on each
rank), DeepSpeed ZeRO-3 and FSDP (1 chat a micro-batch on each rank) each give the step losses of one process
training on the step's chats in one micro-batch, token-weighted; under ZeRO-3 and FSDP the teacher is sharded as the
student is, and its head and the student's run a tile at a time with their weights gathered."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from distill_rows import chat_data, gsm8k_chats, write_jsonl
from distill_sharded_worker import StepLosses, distill

TESTS = Path(__file__).parent
STEPS, RANKS, LEARNING_RATE = 3, 2, 1e-3


def test_ddp_zero3_and_fsdp_give_the_losses_of_one_process(student_dir, teacher_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    pytest.importorskip("deepspeed")
    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(STEPS * 4))
    # ZeRO-3 and FSDP: 2 chats a step (1 a rank); DDP: 4 (2 accumulated a rank); one process: both
    batches = list(chat_data(tokenizer, chats, batch_size=1).train_dataloader())[: STEPS * RANKS]
    torch.save(batches, tmp_path / "batches.pt")
    expected = {}
    for name, batch_size, path in (("sharded", 2, tmp_path / "first.jsonl"), ("ddp", 4, chats)):
        if name == "sharded":
            write_jsonl(path, gsm8k_chats(STEPS * RANKS))
        one = StepLosses()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, callbacks=[one],
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        data = chat_data(tokenizer, path, batch_size=batch_size)
        trainer.fit(distill(str(student_dir), str(teacher_dir), LEARNING_RATE), data)
        assert len(one.losses) == STEPS and one.losses[-1] < one.losses[0]
        expected[name] = one.losses

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
               str(TESTS / "distill_sharded_worker.py"), str(student_dir), str(teacher_dir), str(chats),
               str(tmp_path / "batches.pt"), str(LEARNING_RATE), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(RANKS)]
    for strategy, reference in (("ddp", "ddp"), ("deepspeed", "sharded"), ("fsdp", "sharded")):
        assert reports[1][strategy] == pytest.approx(reports[0][strategy], rel=1e-6), strategy  # every rank's mean
        assert reports[0][strategy] == pytest.approx(expected[reference], rel=1e-4), strategy

    full = AutoModelForCausalLM.from_pretrained(teacher_dir).num_parameters()
    for report in reports:
        teacher = report["deepspeed_teacher"]
        assert teacher["runs_in"] == "DeepSpeedEngine"
        for size, partition, held in teacher["held"].values():  # [full size, partition, held whole] per weight
            assert partition < size <= RANKS * partition and held == 0  # created into partitions only
        assert report["fsdp_teacher"]["runs_in"] == "FullyShardedDataParallel"
    held = [report["fsdp_teacher"]["held"]["held"] for report in reports]
    assert sum(held) == full and max(held) < full  # each rank holds its shard only
