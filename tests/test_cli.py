"""The command line and the Python API: recipes in, a Hugging Face folder out, one clear line for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cli_runs import command_here
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import run


def lt_posttrain(*args, cwd=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "lt_posttrain.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def here(capsys):
    """``here(*args)``: ``lt-posttrain ARGS`` in this process (:func:`cli_runs.command_here`); ``lt_posttrain`` runs
    the installed command in a process of its own."""
    return lambda *args: command_here(capsys, *args)


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "gsm8k.jsonl", gsm8k_chats(24))


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("lt-posttrain: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0]


def test_missing_model_path(chats, tmp_path):
    result = lt_posttrain("fit", "--model.name_or_path", tmp_path / "no-such-model", "--data.sources", f"[{chats}]")
    assert_one_line_error(result, "model.name_or_path", "no-such-model")


def test_missing_data_file(tiny_model_dir, tmp_path, here):
    missing = tmp_path / "missing.jsonl"
    result = here("fit", "--model.name_or_path", tiny_model_dir, "--data.sources", f"[{missing}]",
                  "--trainer.default_root_dir", tmp_path)  # fmt: skip
    assert_one_line_error(result, "missing.jsonl", "no such file")


def test_unknown_config_key_suggests_the_closest(tiny_model_dir, chats, tmp_path, here):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir), "learnin_rate": 1e-4},
                                      "data": {"sources": [str(chats)]}}))  # fmt: skip
    assert_one_line_error(here("fit", "--config", recipe), "model.learnin_rate", "model.learning_rate")
    result = here("fit", "--config", recipe.with_name("none.yaml"), "--trainer.max_step", "3")
    assert result.returncode == 2


def test_unknown_command_line_key_and_wrong_type(tiny_model_dir, chats, here):
    base = ("fit", "--model.name_or_path", tiny_model_dir, "--data.sources", f"[{chats}]")
    assert_one_line_error(here(*base, "--trainer.max_step", "3"), "trainer.max_step", "trainer.max_steps")
    assert_one_line_error(here(*base, "--data.batch_size", "four"), "data.batch_size", "four")


def test_malformed_yaml(tmp_path, here):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model:\n  name_or_path: x\n  - oops: [\n")
    assert_one_line_error(here("fit", "--config", recipe), "malformed YAML", "broken.yaml", "line")


def test_print_config_shows_the_contract_keys(tiny_model_dir, chats, here):
    result = here("fit", "--model.name_or_path", tiny_model_dir, "--data.sources", f"[{chats}]", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load(result.stdout)
    assert config["model"]["init_args"]["name_or_path"] == str(tiny_model_dir)
    assert {"learning_rate", "weight_decay", "warmup", "schedule"} <= set(config["model"]["init_args"])
    assert {"sources", "max_length", "batch_size", "val_fraction", "val_sources"} <= set(config["data"]["init_args"])
    assert {"output_dir", "save_end_of_training", "save_every_n_steps"} <= set(config["checkpoint"])


def test_python_api_runs_a_dict_recipe_and_saves_config_and_model(tiny_model_dir, chats, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {
        "seed_everything": 0,
        "model": {"name_or_path": str(tiny_model_dir), "learning_rate": 1e-3, "warmup": 1, "schedule": "linear"},
        "data": {"sources": [{"name_or_path": str(chats), "sample_count": 16}], "val_fraction": 0.25, "batch_size": 2},
        "trainer": {"accelerator": "cpu", "max_steps": 3, "default_root_dir": str(tmp_path), "enable_progress_bar": False},
    }
    cli = run(recipe, "fit")
    run_dir = Path(cli.trainer.log_dir)
    assert cli.trainer.global_step == 3
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["learning_rate"] == 1e-3
    assert saved["data"]["init_args"]["sources"][0]["sample_count"] == 16
    exported = run_dir / "hf_model"  # the default output_dir: under the run directory
    model = AutoModelForCausalLM.from_pretrained(exported)
    trained = cli.model.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert (tensor == trained[name]).all(), name


def test_validate_test_and_predict_subcommands(tiny_model_dir, chats, tmp_path, here):
    common = ("--model.name_or_path", tiny_model_dir, "--data.sources", f"[{chats}]", "--data.val_fraction", "0.25",
              "--trainer.accelerator", "cpu", "--trainer.default_root_dir", tmp_path)  # fmt: skip
    for command in ("validate", "test"):
        result = here(command, *common)
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("val/loss" if command == "validate" else "test/loss") in result.stdout
    output = tmp_path / "predictions.jsonl"
    result = here("predict", *common, "--model.max_new_tokens", "4", "--data.batch_size", "3",
                          "--predictions.output_path", output)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    expected = gsm8k_chats(24)
    assert [record["reference"] for record in records] == [chat["messages"][1]["content"] for chat in expected]
    assert all(record["prompt"].endswith("<|im_start|>assistant\n") for record in records)
    assert all(isinstance(record["generated"], str) for record in records)


def test_custom_trainer_from_the_command_line(tiny_model_dir, chats, tmp_path, here):
    """``--model pkg.Class`` picks a subclass; its ``loss`` is used and its own arguments are keys."""
    import csv

    def first_loss(*model_args) -> float:
        root = tmp_path / "-".join(model_args or ("sft",)).replace(".", "_")
        result = here(
            "fit", *model_args, "--model.name_or_path", str(tiny_model_dir), "--data.sources", f"[{chats}]",
            "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.log_every_n_steps", "1",
            "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(root),
            "--checkpoint.save_end_of_training", "false", "--trainer.enable_checkpointing", "false",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        metrics = next(root.rglob("metrics.csv"))
        return float(next(row["train/loss"] for row in csv.DictReader(metrics.open()) if row["train/loss"]))

    plain = first_loss()
    smoothed = first_loss("--model", "custom_trainer.LabelSmoothingSFT", "--model.smoothing", "0.5")
    assert smoothed != pytest.approx(plain, rel=1e-4)  # label smoothing changes the loss of the same batch


def test_hf_export_every_n_steps(tiny_model_dir, chats, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "export"
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"sources": [str(chats)], "batch_size": 4},
        "trainer": {"accelerator": "cpu", "max_steps": 4, "default_root_dir": str(tmp_path), "logger": False,
                    "enable_progress_bar": False, "enable_checkpointing": False},
        "checkpoint": {"output_dir": str(output), "save_every_n_steps": 2},
    }  # fmt: skip
    run(recipe)
    assert sorted(p.name for p in output.iterdir() if p.is_dir()) == ["step-2", "step-4"]
    step2 = AutoModelForCausalLM.from_pretrained(output / "step-2").state_dict()
    final = AutoModelForCausalLM.from_pretrained(output).state_dict()
    step4 = AutoModelForCausalLM.from_pretrained(output / "step-4").state_dict()
    assert all(torch.equal(final[name], step4[name]) for name in final)
    assert any(not torch.equal(step2[name], step4[name]) for name in step2)
    assert not [p for p in output.iterdir() if p.name.startswith(".partial")]
