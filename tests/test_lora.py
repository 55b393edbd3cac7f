"""LoRA from the recipe: a fit trains only the adapters, the adapter folder loads with PEFT and gives the trained
model's logits, the merged export gives them too, and the keys parse, print and fail like every other key."""

from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SMOLLM2_GGUF, gsm8k_chats, needs_smollm2, write_jsonl
from lt_posttrain import run
from lt_posttrain.cli import main
from lt_posttrain.data.tokenize import tokenize_conversation
from lt_posttrain.model.export import export_hf
from lt_posttrain.model.loading import gguf_as_hf_folder, resolve_model_path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "gsm8k.jsonl", gsm8k_chats(24))


def lora_fit(name_or_path, chats, tmp_path, lora: dict, steps: int, max_length: int = 384, **checkpoint):
    return run({
        "seed_everything": 0,
        "model": {"name_or_path": str(name_or_path), "learning_rate": 1e-2, "lora": lora},
        "data": {"sources": [str(chats)], "max_length": max_length, "batch_size": 2, "val_fraction": 0},
        "trainer": {"accelerator": "cpu", "max_steps": steps, "default_root_dir": str(tmp_path), "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False},
        "checkpoint": {"output_dir": str(tmp_path / "export"), **checkpoint},
    })  # fmt: skip


def held_out_ids(tokenizer, length: int = 256) -> torch.Tensor:
    sample = tokenize_conversation(gsm8k_chats(1, start=5000)[0]["messages"], tokenizer, length)[0]
    return torch.tensor([sample["input_ids"]])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits


def assert_base_weights_unchanged(trained, base_dir) -> None:
    """Every weight of the trained model that is not an adapter equals the base model's, bit for bit."""
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    frozen = {
        name.replace(".base_layer", ""): parameter
        for name, parameter in trained.get_base_model().named_parameters()
        if "lora_" not in name
    }
    assert frozen.keys() <= base.keys() and len(frozen) >= len(base) - 1  # a tied head is listed once
    for name, parameter in frozen.items():
        assert not parameter.requires_grad and torch.equal(parameter, base[name]), name


def test_lora_fit_on_tiny_model_exports_merged_and_adapter(tiny_model_dir, chats, tmp_path, caplog):
    with caplog.at_level("INFO"):
        cli = lora_fit(tiny_model_dir, chats, tmp_path, {"r": 4, "alpha": 8}, steps=3, merge_lora=True)
    trained, tokenizer = cli.model.model, cli.model.tokenizer
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trained.parameters())
    assert f"trainable parameters: {trainable:,} of {total:,}" in caplog.text
    assert 0 < trainable < total / 50
    ids = held_out_ids(tokenizer)
    expected = logits(trained, ids)
    assert not torch.allclose(expected, logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids), atol=1e-3)
    assert_base_weights_unchanged(trained, tiny_model_dir)

    merged_dir = tmp_path / "export"  # checkpoint.merge_lora: a plain Hugging Face model
    assert not (merged_dir / "adapter_config.json").exists()
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(merged_dir), ids), expected, atol=1e-4, rtol=0
    )

    adapter_dir = export_hf(trained, tokenizer, tmp_path / "adapter")
    assert (adapter_dir / "adapter_config.json").exists() and not (adapter_dir / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-6, rtol=0)
    assert AutoTokenizer.from_pretrained(adapter_dir).chat_template == tokenizer.chat_template
    torch.testing.assert_close(logits(trained, ids), expected, atol=0, rtol=0)  # exporting left the model as it was


@needs_smollm2
@pytest.mark.slow
def test_lora_fit_on_smollm2_adapter_loads_with_peft_and_merges(chats, tmp_path):
    base_dir = gguf_as_hf_folder(resolve_model_path(SMOLLM2_GGUF))
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj"]}
    cli = lora_fit(SMOLLM2_GGUF, chats, tmp_path, lora, steps=3, max_length=128)
    trained, tokenizer = cli.model.model, cli.model.tokenizer
    ids = held_out_ids(tokenizer, 96)
    expected = logits(trained, ids)

    adapter_dir = tmp_path / "export"  # the default: the adapter, through the checkpoint section
    assert (adapter_dir / "adapter_model.safetensors").exists() and not (adapter_dir / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=0)
    with loaded.disable_adapter():
        base_logits = logits(loaded, ids)
    assert (base_logits - expected).abs().max() > 1e-2  # three steps moved the model

    merged = AutoModelForCausalLM.from_pretrained(export_hf(trained, tokenizer, tmp_path / "merged", merge_lora=True))
    torch.testing.assert_close(logits(merged, ids), expected, atol=2e-4, rtol=0)
    assert_base_weights_unchanged(trained, base_dir)


def run_main(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit:
        main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return exit.value.code, out, err


def test_lora_keys_on_the_command_line_and_in_yaml(tiny_model_dir, chats, tmp_path, capsys):
    base = ("fit", "--model.name_or_path", tiny_model_dir, "--data.sources", f"[{chats}]")
    code, out, _ = run_main(capsys, *base, "--model.lora.r", "16", "--model.lora.target_modules", "[q_proj, v_proj]",
                            "--print_config")  # fmt: skip
    lora = yaml.safe_load(out)["model"]["init_args"]["lora"]
    assert code == 0 and lora["r"] == 16 and lora["target_modules"] == ["q_proj", "v_proj"]
    assert {"alpha", "dropout", "bias", "use_rslora", "use_dora", "modules_to_save"} <= set(lora)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "use_dora": True}},
                                      "data": {"sources": [str(chats)]}}))  # fmt: skip
    code, out, _ = run_main(capsys, "fit", "--config", recipe, "--print_config")
    lora = yaml.safe_load(out)["model"]["init_args"]["lora"]
    assert code == 0 and lora["r"] == 4 and lora["use_dora"] is True and lora["target_modules"] == "all-linear"
    code, out, _ = run_main(capsys, "fit", "--config", recipe, "--model.lora", "null", "--print_config")
    assert code == 0 and yaml.safe_load(out)["model"]["init_args"]["lora"] is None

    code, _, err = run_main(capsys, *base, "--model.lora.r", "sixteen")
    assert code == 2 and err.count("\n") == 1 and "model.lora.r" in err and "sixteen" in err
    code, _, err = run_main(capsys, *base, "--model.lora.bias", "some")
    assert code == 2 and err.count("\n") == 1 and "model.lora.bias" in err
