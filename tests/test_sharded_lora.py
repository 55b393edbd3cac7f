"""LoRA under sharding, for real, on two CPU processes (DeepSpeed ZeRO-3, FSDP): a few steps, then the adapter export
written by rank 0 alone holds the trained adapter whole (not the empty partitions a rank holds), loads with PEFT on
the untouched base, and gives the logits of the same steps unsharded in one process; so does the merged export.
DoRA, which ZeRO-3 cannot run, is refused in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import InstructDataModule, SFTModule
from lt_posttrain.errors import UserError
from lt_posttrain.model.lora import LoraOptions, apply_lora
from lt_posttrain.training.optimizer import build_optimizer
from lt_posttrain.training.sharding import fit_to_strategy
from sharded_lora_worker import LEARNING_RATE, LORA, one_process_steps

TESTS = Path(__file__).parent
STEPS, RANKS = 3, 2
ADAPTED = len(LORA["target_modules"]) * 2  # per layer of the tiny Llama's 2: (q, v) x (A, B)


@pytest.fixture(scope="module")
def micro_batches(tokenizer, tmp_path_factory) -> list[dict]:
    """``STEPS * RANKS`` micro-batches of one conversation each."""
    path = write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", gsm8k_chats(STEPS * RANKS))
    data = InstructDataModule([str(path)], max_length=512, batch_size=1, shuffle=False)
    data.connect(tokenizer)
    data.setup("fit")
    return list(data.train_dataloader())


def base_name(name: str) -> str:
    """The base model's name of a frozen weight of the LoRA model."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def unsharded_run(model_dir, micro_batches: list[dict], initial: dict) -> tuple[torch.nn.Module, list[float], dict]:
    """The same steps in one process, each over the micro-batches of every rank, from the adapter weights
    ``initial``: the trained model, the step losses, and the adapter weights this process drew itself."""
    L.seed_everything(0)
    module = SFTModule(str(model_dir), learning_rate=LEARNING_RATE, lora=LORA)
    module.configure_model()
    drawn = {name: p.detach().clone() for name, p in module.model.named_parameters() if p.requires_grad}
    module.model.load_state_dict({name: initial[name] for name in drawn}, strict=False)
    optimizer = build_optimizer("adamw", module.model, LEARNING_RATE, 0.0)
    losses = one_process_steps(module, optimizer, micro_batches, RANKS)
    return module.model, losses, drawn


def run_ranks(strategy: str, model_dir, micro_batches: list[dict], folder: Path) -> list[dict]:
    torch.save(micro_batches, folder / "batches.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
               str(TESTS / "sharded_lora_worker.py"), strategy, str(model_dir), str(folder / "batches.pt"),
               str(folder)]  # fmt: skip
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((folder / f"rank-{rank}.json").read_text()) for rank in range(RANKS)]


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp"])
def test_sharded_lora_trains_and_exports_the_adapter_whole(strategy, tiny_model_dir, micro_batches, tmp_path):
    """The one-process run starts from the sharded run's adapter: ZeRO-3 draws A from another point of the random
    stream than PEFT in one process (the distribution is the same), FSDP from the same one."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    from peft import PeftModel

    reports = run_ranks(strategy, tiny_model_dir, micro_batches, tmp_path)
    initial, trained = torch.load(tmp_path / "initial.pt"), torch.load(tmp_path / "trained.pt")
    held = [report["held"] for report in reports]
    if strategy == "deepspeed":
        assert held == [0] * RANKS  # every weight partitioned, none held whole
    else:
        assert sum(held) == reports[0]["full"] and max(held) < reports[0]["full"]
    assert [report["wrote"] for report in reports] == [["adapter", "merged"]] + [[]] * (RANKS - 1)
    assert all(report["losses"] == reports[0]["losses"] for report in reports)

    reference, losses, drawn = unsharded_run(tiny_model_dir, micro_batches, initial)
    assert drawn.keys() == {name for name in initial if ".lora_" in name} and len(drawn) == 2 * ADAPTED
    for name, weight in drawn.items():
        if ".lora_B." in name:  # the adapters start as the identity
            assert not initial[name].any(), name
        elif strategy == "fsdp":  # every rank drew A as one process does
            assert torch.equal(initial[name], weight), name
        else:  # ZeRO-3 partitions A as it is created: its values are the new layer's own draw, on rank 0
            bound = weight.shape[1] ** -0.5  # that of PEFT's kaiming-uniform init too
            assert initial[name].any() and initial[name].abs().max() <= bound, name
    assert reports[0]["losses"] == pytest.approx(losses, rel=1e-5)

    folder = tmp_path / "adapter"
    assert not list(folder.glob(".partial-*"))
    adapter = load_file(folder / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(name.replace(".default", "") for name in drawn)
    for name, value in adapter.items():  # whole, trained, and what training held
        in_training = trained[name.replace(".weight", ".default.weight")]
        assert value.shape == in_training.shape and value.any(), name
        torch.testing.assert_close(value, in_training, rtol=0, atol=1e-6, msg=name)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    checkpoint = original.state_dict()
    frozen = [name for name in trained if ".lora_" not in name]
    assert sorted(map(base_name, frozen)) == sorted(name for name in checkpoint if name != "lm_head.weight")  # tied
    assert all(torch.equal(trained[name], checkpoint[base_name(name)]) for name in frozen)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, folder)
    parameters = dict(loaded.named_parameters())
    assert all(torch.equal(parameters[name], adapter[name.replace(".default", "")]) for name in drawn)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = micro_batches[0]["input_ids"]
    with torch.no_grad():
        logits = reference(input_ids=ids).logits
        assert (logits - original(input_ids=ids).logits).abs().max() > 1e-3  # what the steps changed
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=0, atol=1e-5)


def test_dora_under_zero3_is_refused_in_one_line(tiny_model_dir):
    """PEFT's DoRA reads A's shape and B outside their layers, where ZeRO-3 holds empty partitions (an IndexError in
    the first forward); FSDP gathers the whole decoder layer, so it is left alone there."""
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    options = LoraOptions(r=4, dropout=0.0, target_modules=["q_proj"], use_dora=True)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), options)
    with pytest.raises(UserError, match="^model.lora.use_dora: .* ZeRO-3 .*; set model.lora.use_dora false"):
        fit_to_strategy(model, DeepSpeedStrategy(stage=3))
