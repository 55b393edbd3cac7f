"""The bad-input catalogue (docs/errors.md), through the command line: each bad input gets one line on stderr naming
what is wrong and what to do, exit status 2, no traceback, and nothing saved before is lost. Entries tested
elsewhere are named in docs/errors.md. Most run in this process (seconds faster than a new one each)."""

import json
import shutil
from fractions import Fraction
from pathlib import Path

import lightning as L
import pytest
import torch

from cli_runs import failing_here
from conftest import gsm8k_chats, write_jsonl
from test_cli import assert_one_line_error, lt_posttrain

QUIET = ("--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false")


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "gsm8k.jsonl", gsm8k_chats(12))


@pytest.fixture
def run_here(capsys):
    """``run_here(*args)``: :func:`failing_here` without the ``capsys``."""
    return lambda *args: failing_here(capsys, *args)


@pytest.fixture
def fit(run_here, tiny_model_dir, chats, tmp_path):
    """``fit(*args, sources=...)``: ``run_here`` of a two-step fit of the tiny model in ``tmp_path``; ``sources`` is a
    ``data.sources`` value (default: GSM8K chats)."""

    def run(*args, sources: str = f"[{chats}]"):
        return run_here("fit", "--model.name_or_path", tiny_model_dir, "--data.sources", sources,
                        "--trainer.max_steps", "2", "--trainer.default_root_dir", tmp_path, *QUIET, *args)  # fmt: skip

    return run


# ---------------------------------------------------------------- the recipe


def test_missing_required_keys(run_here):
    assert_one_line_error(run_here("fit"), "missing required key(s): data, model", "--model.name_or_path")


def test_a_class_without_its_required_key(fit):
    assert_one_line_error(fit("--trainer.logger", "CSVLogger"), "missing required key(s): trainer.logger.save_dir")


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--training_state.every_n_steps", "-1", "every_n_steps must be >= 0"),
        ("--nonfinite_loss.action", "ignore", "nonfinite_loss.action"),
    ],
)
def test_an_option_out_of_range(fit, option, value, message):
    assert_one_line_error(fit(option, value), message, value)


@pytest.mark.parametrize(
    "model,message",
    [
        ("no_such_trainer", "unknown trainer 'no_such_trainer' ("),
        ("no_such_package.Trainer", "No module named 'no_such_package'"),
    ],
)
def test_an_unknown_trainer(fit, model, message):
    assert_one_line_error(fit("--model", model), message)


# ---------------------------------------------------------------- the data


def test_a_malformed_jsonl_row(tiny_model_dir, tmp_path):
    """In a process of its own: the data-set library logs the parse error too, through a handler that outlives a
    test's captured stderr."""
    lines = [json.dumps(row) for row in gsm8k_chats(3)]
    lines.insert(1, '{"messages": [{"role": "user", "content": "unterminated}')
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(lines) + "\n")
    result = lt_posttrain("fit", "--model.name_or_path", tiny_model_dir, "--data.sources", f"[{data}]",
                          "--trainer.default_root_dir", tmp_path, *QUIET)  # fmt: skip
    assert_one_line_error(result, "chats.jsonl, line 2: malformed JSON", "fix or remove that line")


def test_a_mapped_column_that_is_missing(fit, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1 + 1?", "answer": "2"}])
    mapping = "{user: query, assistant: answer}"
    sources = f"[{{type: huggingface_instruct, name_or_path: {data}, role_mapping: {mapping}}}]"
    assert_one_line_error(fit(sources=sources), "qa.jsonl', row 0", "'query'", "question, answer")


def test_data_empty_after_filtering(fit, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}]}, {"messages": [{"role": "system", "content": "Be kind"}]}]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    assert_one_line_error(fit(sources=f"[{data}]"), "no training sample", "2 rows dropped", "no assistant turn")


# ---------------------------------------------------------------- where the run writes


@pytest.fixture
def a_file(tmp_path) -> Path:
    """A plain file: no folder can be made under it (whoever runs the test, root included)."""
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


@pytest.mark.parametrize(
    "option,key",
    [
        ("--trainer.default_root_dir", "trainer.default_root_dir"),
        ("--training_state.dirpath", "training_state.dirpath"),
        ("--trainer.logger.save_dir", "the log folder"),
    ],
)
def test_a_folder_that_cannot_be_written_fails_before_training(fit, tmp_path, a_file, option, key):
    logger = ("--trainer.logger", "CSVLogger") if "logger" in option else ()
    result = fit(*logger, option, a_file / "sub")
    assert_one_line_error(result, key, "a-file", "cannot write there (Not a directory)")
    assert not (tmp_path / "checkpoints").exists()  # failed before any step


@pytest.mark.parametrize("where,reason", [("a-file/model", "Not a directory"), ("a-file", "File exists")])
def test_an_export_folder_that_cannot_be_written_fails_before_training(fit, tmp_path, a_file, where, reason):
    result = fit("--training_state.every_n_steps", "1", "--checkpoint.output_dir", tmp_path / where)
    assert_one_line_error(result, "checkpoint.output_dir", where, f"cannot write there ({reason})")
    assert not list(tmp_path.glob("checkpoints/*"))  # failed before any step


class ExportFolderTurnsIntoAFile(L.Callback):
    """Replaces ``folder`` (written to at setup) by a file once training starts."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_start(self, trainer, pl_module) -> None:
        shutil.rmtree(self.folder)
        self.folder.write_text("not a folder\n")


def test_an_export_folder_that_cannot_be_written_at_the_end_keeps_the_checkpoints(fit, tmp_path):
    folder = tmp_path / "model"
    callback = (f"--trainer.callbacks+={__name__}.ExportFolderTurnsIntoAFile", "--trainer.callbacks.folder", folder)
    result = fit("--training_state.every_n_steps", "1", "--checkpoint.output_dir", folder, *callback)
    assert_one_line_error(result, "checkpoint.output_dir", "exists and is not a folder")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # the trained state can still be resumed and exported


# ---------------------------------------------------------------- --ckpt_path


@pytest.fixture(scope="module")
def not_checkpoints(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("not-checkpoints")
    (folder / "truncated.ckpt").write_bytes(b"PK\x03\x04 not a whole zip archive")
    torch.save({"state_dict": {}}, folder / "plain.ckpt")
    pickled = {"pytorch-lightning_version": "2.6.6", "state_dict": {}, "note": Fraction(1, 3)}
    torch.save(pickled, folder / "pickled.ckpt")
    (folder / "not-a-checkpoint").mkdir()
    (folder / "half-written.ckpt" / "checkpoint").mkdir(parents=True)  # DeepSpeed writes its 'latest' file last
    torch.save(pickled, folder / "half-written.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt")
    (folder / "pickled-deepspeed.ckpt" / "checkpoint").mkdir(parents=True)  # a DeepSpeed checkpoint folder
    torch.save(pickled, folder / "pickled-deepspeed.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt")
    (folder / "pickled-deepspeed.ckpt" / "latest").write_text("checkpoint")
    return folder


@pytest.mark.parametrize(
    "name,message",
    [
        ("missing.ckpt", "no such checkpoint file"),
        ("truncated.ckpt", "cannot be read, truncated or not a checkpoint"),
        ("plain.ckpt", "not a training checkpoint"),
        ("pickled.ckpt", "holds objects other than tensors and plain values"),
        ("not-a-checkpoint", "a folder, but not a complete checkpoint"),
        ("half-written.ckpt", "a folder, but not a complete checkpoint"),
        ("pickled-deepspeed.ckpt", "mp_rank_00_model_states.pt: holds objects other than tensors and plain values"),
    ],
)
def test_a_ckpt_path_that_is_not_a_usable_checkpoint(fit, not_checkpoints, name, message):
    assert_one_line_error(fit("--ckpt_path", not_checkpoints / name), name, message)


# ---------------------------------------------------------------- code that comes with a model


@pytest.fixture
def model_with_code(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """The tiny model whose config names its own Python class (``auto_map``); importing that module leaves a file."""
    folder = tmp_path / "model-with-code"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "the-model's-code-ran"
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "own_code.OwnConfig", "AutoModelForCausalLM": "own_code.OwnLlama"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "own_code.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\nclass OwnConfig(LlamaConfig):\n    pass\n\n\n"
        "class OwnLlama(LlamaForCausalLM):\n    config_class = OwnConfig\n"
    )
    return folder, marker


def test_a_models_own_code_runs_only_when_the_recipe_says_so(model_with_code, chats, tmp_path, monkeypatch):
    """In a process of its own: transformers reads where it copies such code (``HF_MODULES_CACHE``) when imported."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder, marker = model_with_code
    args = ("fit", "--model.name_or_path", folder, "--data.sources", f"[{chats}]", "--trainer.max_steps", "1",
            "--trainer.default_root_dir", tmp_path, "--trainer.enable_checkpointing", "false",
            "--checkpoint.save_end_of_training", "false", *QUIET)  # fmt: skip
    result = lt_posttrain(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()
    result = lt_posttrain(*args, "--model.trust_remote_code", "true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert marker.exists()


@pytest.mark.parametrize(
    "config,message",
    [
        ({"model_type": "own_llama", "auto_map": {"AutoConfig": "own.OwnConfig"}}, "set model.trust_remote_code: true"),
        ({"model_type": "llama_of_the_future"}, "does not know model_type 'llama_of_the_future'"),
    ],
)
def test_an_architecture_transformers_does_not_have(fit, tiny_model_dir, tmp_path, config, message):
    folder = tmp_path / "unknown-architecture"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **config}))
    assert_one_line_error(fit("--model.name_or_path", folder), "unknown-architecture", message)
