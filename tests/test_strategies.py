"""Strategies from the recipe: Lightning's DeepSpeed and FSDP presets and classes resolve through the CLI, what cannot
run here is one line before anything loads, and DeepSpeed and FSDP get what this framework needs of them."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.strategies import StrategyRegistry

from conftest import write_jsonl
from lt_posttrain.cli import main
from lt_posttrain.errors import UserError
from lt_posttrain.training.sharding import fit_to_strategy
from lt_posttrain.training.strategy import (check_deepspeed_config, check_strategy, complete_deepspeed_config,
                                     leave_process_group, prepare_strategy)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ["ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
           "deepspeed_stage_3_offload", "fsdp", "fsdp_cpu_offload"]  # fmt: skip
needs_deepspeed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="needs deepspeed: pip install '.[deepspeed]'"
)


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi!"}]}
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", [chat] * 4)


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """The CLI below runs in this process: pytest's own arguments are not its command line."""
    monkeypatch.setattr(sys, "argv", ["lt-posttrain"])


def cli(capsys, *args) -> tuple[int, str, str]:
    """``lt-posttrain ARGS`` in this process: (exit status, stdout, stderr)."""
    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def strategy_error(capsys, tmp_path, *args) -> str:
    """The one error line of ``fit ARGS`` with a model and data that do not exist: the strategy's line coming first
    shows it is checked before any model or data loads."""
    code, _, err = cli(capsys, "fit", "--model.name_or_path", tmp_path / "no-model", "--data.sources",
                       f"[{tmp_path / 'no-data.jsonl'}]", *args)  # fmt: skip
    line = one_line_error(code, err)
    assert "no-model" not in line and "no-data" not in line
    return line


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    [line] = [line for line in err.splitlines() if line.startswith("lt-posttrain: error:")]
    return line


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_resolve_in_print_config(capsys, tiny_model_dir, chats, preset):
    code, out, err = cli(capsys, "fit", "--model.name_or_path", tiny_model_dir, "--data.sources", f"[{chats}]",
                         "--trainer.strategy", preset, "--print_config")  # fmt: skip
    assert code == 0, err[-2000:]
    assert yaml.safe_load(out)["trainer"]["strategy"] == preset
    assert preset in StrategyRegistry  # the name the Trainer looks up


def test_deepspeed_class_with_a_config_file_resolves_in_print_config(capsys, tiny_model_dir, chats, tmp_path):
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)}, "data": {"sources": [str(chats)]},
        "trainer": {"strategy": {"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy",
                                 "init_args": {"config": str(ds_config)}}},
    }))  # fmt: skip
    code, out, err = cli(capsys, "fit", "--config", recipe, "--trainer.strategy.init_args.logging_level", "20",
                         "--print_config")  # fmt: skip
    assert code == 0, err[-2000:]
    strategy = yaml.safe_load(out)["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert strategy["init_args"]["config"] == str(ds_config)
    assert strategy["init_args"]["logging_level"] == 20


@pytest.mark.parametrize("recipe", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_recipe_parses(capsys, recipe, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # recipes name files relative to the repository root
    code, out, err = cli(capsys, "fit", "--config", recipe, "--print_config")
    assert code == 0, err[-2000:]
    assert yaml.safe_load(out)["model"]["init_args"]["name_or_path"]


def test_deepspeed_without_the_package_is_one_line_before_anything_loads(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed: find_spec and import both fail
    line = strategy_error(capsys, tmp_path, "--trainer.strategy", "deepspeed_stage_3_offload")
    assert "deepspeed_stage_3_offload needs DeepSpeed" in line and "pip install 'lt-posttrain[deepspeed]'" in line


GPU_ONLY = ["deepspeed_stage_2", "fsdp", "{class_path: DeepSpeedStrategy, init_args: {stage: 3}}"]


@pytest.mark.parametrize("strategy", GPU_ONLY)
def test_gpu_strategies_on_cpu_are_one_line_before_anything_loads(capsys, tmp_path, strategy):
    if strategy.startswith("deepspeed") or "DeepSpeed" in strategy:
        pytest.importorskip("deepspeed")  # without it, the line says to install it (above)
    line = strategy_error(capsys, tmp_path, "--trainer.strategy", strategy, "--trainer.accelerator", "cpu")
    assert "runs on CUDA GPUs only" in line and "trainer.accelerator cpu" in line


@needs_deepspeed
def test_deepspeed_clipping_by_value_is_one_line(capsys, tmp_path):
    arguments = ["--trainer.gradient_clip_val", "1", "--trainer.gradient_clip_algorithm", "value"]
    assert "by norm only" in strategy_error(capsys, tmp_path, "--trainer.strategy", "deepspeed_stage_2", *arguments)


@needs_deepspeed
def test_deepspeed_accumulation_is_accepted_and_run_by_lightning_s_loop():
    """Accumulation is not refused (here only the missing GPU is); the prepared strategy is still the DeepSpeed
    class it was, with accumulation left to Lightning's loop (test_deepspeed_accumulation.py trains with it)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    with pytest.raises(UserError, match="runs on CUDA GPUs only"):
        check_strategy({"strategy": "deepspeed_stage_2", "accumulate_grad_batches": 4, "accelerator": "cpu"})
    strategy = StrategyRegistry.get("deepspeed_stage_2")
    assert strategy.handles_gradient_accumulation  # Lightning's: DeepSpeed's own counting
    prepare_strategy(strategy, micro_batch_size=1)
    prepared = type(strategy)
    prepare_strategy(strategy, micro_batch_size=1)
    assert type(strategy) is prepared and isinstance(strategy, DeepSpeedStrategy)
    assert prepared.__name__ == "DeepSpeedStrategy" and not strategy.handles_gradient_accumulation
    assert strategy.config["zero_optimization"]["stage"] == 2


@needs_deepspeed
@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "no such file"),
        ("{not json", "not a readable JSON file"),
        ('{"gradient_accumulation_steps": 4}', "remove gradient_accumulation_steps"),
        ('{"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}',
         "(bf16.enabled, zero_optimization.reduce_bucket_size)"),
        ('{"zero_optimization": {"stage": 3, "offload_optimizer": {"devic": "cpu"}}}',
         "zero_optimization.offload_optimizer.devic: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_a_deepspeed_config_file_that_cannot_work_is_one_line(capsys, tmp_path, content, fragment):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    strategy = f"{{class_path: lightning.pytorch.strategies.DeepSpeedStrategy, init_args: {{config: {path}}}}}"
    line = strategy_error(capsys, tmp_path, "--trainer.strategy", strategy)
    assert "ds.json" in line and fragment in line


def test_deepspeed_config_as_a_mapping_is_checked_too():
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu"):
        check_deepspeed_config({"train_micro_batch_size_per_gpu": "auto"})
    with pytest.raises(UserError, match="must be a JSON object"):
        check_deepspeed_config([1, 2])
    assert check_deepspeed_config({"zero_optimization": {"stage": 2}}) == {"zero_optimization": {"stage": 2}}


def test_completed_deepspeed_config_keeps_what_the_user_set():
    offloaded = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    completed = complete_deepspeed_config(offloaded, micro_batch_size=4)
    assert completed["train_micro_batch_size_per_gpu"] == 4 and completed["zero_force_ds_cpu_optimizer"] is False
    assert "train_micro_batch_size_per_gpu" not in offloaded  # a copy
    chosen = {**offloaded, "train_micro_batch_size_per_gpu": 2, "zero_force_ds_cpu_optimizer": True,
              "zero_allow_untested_optimizer": False}  # fmt: skip
    assert complete_deepspeed_config(chosen, micro_batch_size=4) == chosen
    on_gpu = complete_deepspeed_config({"zero_optimization": {"stage": 2}}, micro_batch_size=1)
    assert "zero_force_ds_cpu_optimizer" not in on_gpu
    assert on_gpu["zero_allow_untested_optimizer"] is True
    own_optimizer = complete_deepspeed_config({**offloaded, "optimizer": {"type": "Adam"}}, micro_batch_size=1)
    assert "zero_force_ds_cpu_optimizer" not in own_optimizer  # DeepSpeed builds its own CPU Adam then
    assert "zero_allow_untested_optimizer" not in own_optimizer
    nvme = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}
    assert complete_deepspeed_config(nvme, 1)["zero_force_ds_cpu_optimizer"] is False


@needs_deepspeed
@pytest.mark.parametrize(
    "preset, stage, offloaded",
    [("deepspeed_stage_1", 1, False), ("deepspeed_stage_2", 2, False), ("deepspeed_stage_2_offload", 2, True),
     ("deepspeed_stage_3", 3, False), ("deepspeed_stage_3_offload", 3, True),
     ("configs/deepspeed/zero3_offload.json", 3, True)],
)  # fmt: skip
def test_deepspeed_presets_and_the_example_file_complete_to_configs_deepspeed_accepts(preset, stage, offloaded):
    from deepspeed.runtime.config import DeepSpeedConfig
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if preset.endswith(".json"):
        strategy = DeepSpeedStrategy(config=str(CONFIGS.parent / preset))
    else:
        strategy = StrategyRegistry.get(preset)
    prepare_strategy(strategy, micro_batch_size=3)
    accepted = DeepSpeedConfig({**strategy.config, "gradient_accumulation_steps": 1})  # Lightning sets the latter
    assert accepted.zero_optimization_stage == stage and accepted.train_micro_batch_size_per_gpu == 3
    assert accepted.zero_allow_untested_optimizer and accepted.zero_force_ds_cpu_optimizer is not offloaded


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_fsdp_wraps_each_decoder_layer_unless_told_otherwise(tiny_model):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP

    strategy = FSDPStrategy()
    fit_to_strategy(tiny_model, strategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {LlamaDecoderLayer}

    chosen = FSDPStrategy(auto_wrap_policy={LlamaMLP})
    fit_to_strategy(tiny_model, chosen)
    assert chosen.kwargs["auto_wrap_policy"]._module_classes == {LlamaMLP}


def test_fsdp_finds_the_decoder_layers_under_lora(tiny_model):
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lt_posttrain.model.lora import LoraOptions, apply_lora

    pytest.importorskip("peft")
    strategy = FSDPStrategy()
    fit_to_strategy(apply_lora(tiny_model, LoraOptions(r=2)), strategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}


def test_fused_loss_under_a_sharding_strategy_is_refused(tiny_model):
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(UserError, match="fused_linear_cross_entropy"):
        fit_to_strategy(tiny_model, FSDPStrategy(), fused_loss=True)
    fit_to_strategy(tiny_model, None, fused_loss=True)  # one device: the head's weight is whole


def test_a_finished_run_leaves_its_gloo_process_group(tmp_path):
    """Lightning destroys only an NCCL group at exit; a gloo group left alive can abort the exiting process."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    leave_process_group()
    assert not torch.distributed.is_initialized()
    leave_process_group()  # none left: nothing to do


def test_one_classifier_answers_for_names_class_paths_classes_and_objects():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

    from lt_posttrain.training.strategy import Distribution, distribution

    deepspeed = "lightning.pytorch.strategies.DeepSpeedStrategy"
    cases = {
        None: Distribution("single"),
        "ddp": Distribution("ddp"),
        "deepspeed_stage_2_offload": Distribution("deepspeed", 2),
        "deepspeed_stage_3": Distribution("deepspeed", 3),
        "fsdp_cpu_offload": Distribution("fsdp"),
        "auto": Distribution("other"),
        "single_device": Distribution("single"),
        FSDPStrategy: Distribution("fsdp"),
        DDPStrategy: Distribution("ddp"),
    }
    for strategy, expected in cases.items():
        assert distribution(strategy) == expected, strategy
    assert distribution({"class_path": deepspeed, "init_args": {"stage": 3}}) == Distribution("deepspeed", 3)
    assert distribution({"class_path": "lightning.pytorch.strategies.FSDPStrategy"}).family == "fsdp"
    assert distribution(SingleDeviceStrategy("cpu")) == Distribution("single")
    zero3 = DeepSpeedStrategy(stage=3)
    assert distribution(zero3).zero3 and distribution(zero3).shards_weights and distribution(zero3).keeps_master_weights
    prepare_strategy(zero3, micro_batch_size=1)  # the class Lightning's loop accumulates with is still DeepSpeed
    assert distribution(zero3) == Distribution("deepspeed", 3)
    zero2 = distribution(DeepSpeedStrategy(stage=2))
    assert zero2.keeps_master_weights and not zero2.shards_weights
    assert not distribution("ddp").shards_weights and not distribution("ddp").keeps_master_weights
    assert distribution("fsdp").shards_weights and not distribution("fsdp").keeps_master_weights
