"""The Hugging Face export of a sharded model: weights gathered from the shards (DeepSpeed ZeRO-3 for real, on two CPU
processes), written as size-capped safetensors files by the model that holds none of them, and loaded back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import gsm8k_chats
from lt_posttrain.data.prompts import prompt_of
from lt_posttrain.model.export import export_hf, submodule_state_dict
from lt_posttrain.model.lora import LoraOptions, apply_lora, merged_lora_model

TESTS = Path(__file__).parent


def test_submodule_state_dict_takes_the_hf_model_out_of_a_lightning_module():
    weight, head, extra = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    state = {"model.model.embed_tokens.weight": weight, "model.lm_head.weight": head, "value_head.weight": extra}
    assert submodule_state_dict(state, "model") == {"model.embed_tokens.weight": weight, "lm_head.weight": head}
    assert submodule_state_dict({}, "model") == {}


def test_export_writes_given_weights_in_capped_shards_from_a_model_that_holds_none(tiny_model_dir, tokenizer, tmp_path):
    """As under ZeRO-3 or FSDP: the model object has no weights of its own (here: on the meta device); the state
    dict gathered from the shards is what is written, split into files no larger than max_shard_size."""
    trained = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.5)  # unlike the checkpoint the empty model was configured from
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(trained.config)
    output = tmp_path / "export"
    export_hf(empty, tokenizer, output, state_dict=trained.state_dict(), max_shard_size=100_000)

    shards = sorted(output.glob("model-*.safetensors"))
    index = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(shards) > 3 and sorted(set(index.values())) == [shard.name for shard in shards]
    for shard in shards:  # a tensor larger than the cap (the embedding) gets a file of its own
        tensors = [name for name, file in index.items() if file == shard.name]
        assert len(tensors) == 1 or sum(load_file(shard)[name].nbytes for name in tensors) <= 100_000
    reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).state_dict()
    expected = trained.state_dict()
    assert reloaded.keys() == expected.keys()
    assert all(torch.equal(reloaded[name], expected[name]) for name in expected)

    export_hf(trained, tokenizer, output)  # a later export in one file: the shards and index of this one go
    assert sorted(path.name for path in output.glob("model*.safetensors*")) == ["model.safetensors"]
    assert AutoModelForCausalLM.from_pretrained(output).state_dict().keys() == expected.keys()


@pytest.fixture
def lora_model(tiny_model_dir):
    pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return apply_lora(base, LoraOptions(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))


def gathered_adapter(model) -> dict:
    """What gathering a LoRA model's trainable weights returns, with values the model itself does not hold."""
    return {name: torch.randn_like(p) for name, p in model.named_parameters() if p.requires_grad}


def test_adapter_export_writes_the_given_adapter_weights(lora_model, tokenizer, tmp_path):
    from peft import PeftModel

    state = gathered_adapter(lora_model)
    export_hf(lora_model, tokenizer, tmp_path / "adapter", state_dict=state)
    written = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(written) == len(state) == 8  # 2 layers x (q, v) x (A, B)
    for name, value in state.items():
        assert torch.equal(written[name.replace(".default", "")], value), name

    base = AutoModelForCausalLM.from_pretrained(lora_model.peft_config["default"].base_model_name_or_path)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert all(torch.equal(dict(loaded.named_parameters())[name], value) for name, value in state.items())


def test_merged_export_merges_the_given_adapter_weights(lora_model):
    state = gathered_adapter(lora_model)
    merged = merged_lora_model(lora_model, state_dict=state).state_dict()
    base = AutoModelForCausalLM.from_pretrained(lora_model.peft_config["default"].base_model_name_or_path)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
    expected = base.state_dict()["model.layers.0.self_attn.q_proj.weight"] + (8 / 4) * b @ a
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)


def test_zero3_loads_into_partitions_and_exports_the_gathered_weights(tiny_model_dir, tokenizer, tmp_path):
    """Two CPU ranks under DeepSpeed ZeRO-3: each holds only empty partitions, yet the gathered export equals the
    checkpoint exactly, and a LoRA adapter starts with B = 0 (PEFT alone leaves the partitioned B random). The same
    launch answers three prompts as the validation answers are generated, the ranks in lockstep with unequal shares:
    transformers' greedy answers of the unpartitioned model."""
    pytest.importorskip("deepspeed")
    from peft import PeftModel

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "zero3_worker.py"), str(tiny_model_dir), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert report["full"]["held"] and all(shape == [0] for shape in report["full"]["held"].values())
        assert all(shape == [0] for shape in report["lora"]["held"].values())
        assert (report["full"]["gathered"] != []) == (rank == 0)
    checkpoint = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32).state_dict()
    assert len(list((tmp_path / "full").glob("model-*.safetensors"))) > 1
    assert exported.keys() == checkpoint.keys()
    assert all(torch.equal(exported[name], checkpoint[name]) for name in checkpoint)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    # the validation answers under ZeRO-3 (rank 1 has one prompt to rank 0's two): transformers' greedy answers
    prompts = [prompt_of(chat["messages"], tokenizer)["input_ids"] for chat in gsm8k_chats(3)]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            answer = base.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=2)
            answer = answer[0, len(prompt) :].tolist()
            expected.append(tokenizer.decode(answer[: answer.index(2)] if 2 in answer else answer))
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert [record["answer"] for record in report["answers"]] == expected, rank

    adapter = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert sorted({name.split(".lora_")[1].split(".")[0] for name in adapter}) == ["A", "B"]
    assert all((value == 0).all() for name, value in adapter.items() if ".lora_B." in name)
    assert all((value != 0).any() for name, value in adapter.items() if ".lora_A." in name)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "lora")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(adapted(input_ids=ids).logits, base(input_ids=ids).logits)  # B = 0: the model is unchanged
