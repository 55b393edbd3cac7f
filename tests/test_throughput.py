"""The throughput meter counts the tokens and model FLOPs of exactly the steps it times."""

import pytest
import torch

from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import run
from lt_posttrain.batch import sample_lengths
from lt_posttrain.callbacks.throughput import FLOPS_CONVENTION, ThroughputMeter, matmul_flops_per_token, matmul_parameters
from lt_posttrain.data.collate import collate_packed, collate_padded


def test_sample_lengths_of_packed_and_padded_batches():
    samples = [{"input_ids": [1] * n, "labels": [1] * n} for n in (3, 5, 2)]
    assert sample_lengths(collate_packed(samples)).tolist() == [3, 5, 2]
    assert sample_lengths(collate_padded(samples, pad_id=0)).tolist() == [3, 5, 2]


def test_matmul_parameters_count_linear_weights_and_the_lm_head(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = model.config
    hidden, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * config.intermediate_size
    assert matmul_parameters(model) == config.num_hidden_layers * per_layer + hidden * config.vocab_size


def _linear_shapes(config) -> list[tuple[int, int]]:
    """``(in, out)`` of every linear layer of the tiny Llama, by hand: q, k, v, o, gate, up, down per layer, the head."""
    hidden, kv, inner = config.hidden_size, config.num_key_value_heads * config.head_dim, config.intermediate_size
    layer = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inner), (hidden, inner),
             (inner, hidden)]  # fmt: skip
    return layer * config.num_hidden_layers + [(hidden, config.vocab_size)]


def test_full_fine_tune_costs_six_flops_per_weight_and_token(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    weights = sum(fan_in * fan_out for fan_in, fan_out in _linear_shapes(model.config))
    assert matmul_flops_per_token(model) == 6 * weights  # forward 2, input gradient 2, weight gradient 2


def test_lora_counts_no_weight_gradient_products_for_frozen_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lt_posttrain.model.lora import LoraOptions, apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraOptions(r=4))
    shapes = _linear_shapes(model.config)
    frozen = sum(fan_in * fan_out for fan_in, fan_out in shapes)  # every base weight, the head included
    adapters = sum(4 * fan_in + fan_out * 4 for fan_in, fan_out in shapes[:-1])  # A: r x in, B: out x r; no head
    assert matmul_flops_per_token(model) == 4 * frozen + 6 * adapters
    assert matmul_parameters(model, trained=True) == adapters


@pytest.mark.parametrize("packing", [True, False])
def test_summary_counts_the_timed_steps(tmp_path, tiny_model_dir, packing, caplog):
    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(24))
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"sources": [str(chats)], "batch_size": 2, "max_length": 512, "packing": packing, "shuffle": False},
        "trainer": {"accelerator": "cpu", "max_steps": 5, "logger": False, "enable_progress_bar": False,
                    "enable_checkpointing": False, "log_every_n_steps": 2, "default_root_dir": str(tmp_path)},
        "checkpoint": {"save_end_of_training": False},
        "throughput": {"warmup_steps": 2, "peak_tflops": 0.5},
    }  # fmt: skip
    with caplog.at_level("INFO"):
        cli = run(recipe, "fit")
    [meter] = [callback for callback in cli.trainer.callbacks if isinstance(callback, ThroughputMeter)]
    batches = list(cli.datamodule.train_dataloader())
    timed = batches[2:5]  # the clock starts when step 2 ends: micro-batches 2, 3 and 4 are timed
    tokens = sum(int(batch["num_tokens"]) for batch in timed)
    config = cli.model.model.config
    flops = sum(
        6 * matmul_parameters(cli.model.model) * int(batch["num_tokens"])
        + 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
        * int((sample_lengths(batch) ** 2).sum())
        for batch in timed
    )
    summary = meter.summary
    assert summary["steps"] == 3
    assert summary["tokens_per_s"] * summary["seconds"] == pytest.approx(tokens)
    assert summary["tflops"] * 1e12 * summary["seconds"] == pytest.approx(flops)
    assert summary["mfu"] == pytest.approx(summary["tflops"] / 0.5)
    assert "peak_gib" not in summary  # no GPU here
    assert set(cli.trainer.logged_metrics) >= {"throughput/tokens_per_s", "throughput/tflops", "throughput/mfu"}
    [line] = [record.getMessage() for record in caplog.records if "throughput over 3 steps" in record.getMessage()]
    assert line.endswith(f"(model FLOPs: {FLOPS_CONVENTION})")


def test_disabled_meter_measures_nothing(tmp_path, tiny_model_dir):
    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(8))
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"sources": [str(chats)], "batch_size": 2, "max_length": 256},
        "trainer": {"accelerator": "cpu", "max_steps": 3, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path)},
        "checkpoint": {"save_end_of_training": False},
        "throughput": {"enabled": False},
    }  # fmt: skip
    cli = run(recipe, "fit")
    assert not any(key.startswith("throughput/") for key in cli.trainer.logged_metrics)
    assert torch.is_tensor(cli.trainer.logged_metrics["train/loss"])
