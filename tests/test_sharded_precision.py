"""bf16 weights under FSDP, for real on two CPU processes: ``model.optimizer: auto`` gives the sharded weights the
Kahan-compensated AdamW, and its updates survive the sharding (the weights end where one process with the same
optimizer ends them, not where plain bf16 AdamW leaves them). DeepSpeed's side, whose ZeRO optimizer keeps fp32
master weights and gets no second compensation, is in ``test_precision.py``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import InstructDataModule, SFTModule
from lt_posttrain.training.optimizer import build_optimizer
from sharded_lora_worker import one_process_steps

TESTS = Path(__file__).parent
STEPS, RANKS, LEARNING_RATE = 30, 2, 1e-5


@pytest.fixture(scope="module")
def micro_batches(tokenizer, tmp_path_factory) -> list[dict]:
    """``STEPS * RANKS`` micro-batches of one conversation each (chats whose answer starts past ``max_length`` are
    left out by the data module, hence some to spare)."""
    path = write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", gsm8k_chats(STEPS * RANKS + 10))
    data = InstructDataModule([str(path)], max_length=128, batch_size=1, shuffle=False)
    data.connect(tokenizer)
    data.setup("fit")
    batches = list(data.train_dataloader())[: STEPS * RANKS]
    assert len(batches) == STEPS * RANKS
    return batches


def one_process_run(model_dir, micro_batches: list[dict], optimizer_name: str) -> dict:
    """The same steps with bf16 weights in one process, each over the micro-batches of every rank."""
    module = SFTModule(str(model_dir), learning_rate=LEARNING_RATE, schedule="constant")
    module.configure_model()
    module.to(torch.bfloat16)
    one_process_steps(module, build_optimizer(optimizer_name, module.model, LEARNING_RATE, 0.0), micro_batches, RANKS)
    return {name: p.detach().clone() for name, p in module.model.named_parameters()}


def test_fsdp_gives_bf16_shards_the_compensated_optimizer_and_keeps_their_updates(
    bf16_exact_model, micro_batches, tmp_path
):
    from transformers import AutoModelForCausalLM

    torch.save(micro_batches, tmp_path / "batches.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
               str(TESTS / "fsdp_precision_worker.py"), "auto", str(bf16_exact_model), str(tmp_path / "batches.pt"),
               str(LEARNING_RATE), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["optimizer"] == "optimi.adamw.AdamW" and len(report["losses"]) == STEPS
    sharded = torch.load(tmp_path / "trained.pt")
    assert all(value.dtype == torch.bfloat16 for value in sharded.values())

    start = AutoModelForCausalLM.from_pretrained(bf16_exact_model).state_dict()
    kahan = one_process_run(bf16_exact_model, micro_batches, "adamw_kahan")
    plain = one_process_run(bf16_exact_model, micro_batches, "adamw")
    names = [name for name, value in kahan.items() if value.ndim >= 2]
    assert sorted(names) == sorted(name for name in sharded if sharded[name].ndim >= 2)

    def distance(weights: dict, reference: dict) -> float:
        return float(sum(((weights[n].float() - reference[n].float()) ** 2).sum() for n in names).sqrt())

    moved = distance(kahan, start)
    sharded_off, plain_off = distance(sharded, kahan) / moved, distance(plain, kahan) / moved
    print(f"relative distance to one process's Kahan run: FSDP with auto {sharded_off:.3f}, plain bf16 {plain_off:.3f}")
    assert moved > 0 and sharded_off < 0.1 and plain_off > 0.5
