"""``--ckpt_path last`` finds the newest complete checkpoint whether it is a file or a folder (DeepSpeed writes each
checkpoint as one), and a checkpoint folder's recipe is read as a file's is. The folders
are laid out as DeepSpeed (and FSDP's sharded state dict) write them, without running either."""

import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from conftest import gsm8k_chats, write_jsonl
from lt_posttrain.callbacks.training_state import TrainingStateCheckpoint, checkpoint_states_file
from lt_posttrain.cli.lightning import PostTrainCLI, build_cli

KINDS = ["file", "deepspeed", "deepspeed_zero3", "fsdp_sharded"]


def write_checkpoint(path: Path, kind: str, step: int, complete: bool = True, hparams: dict | None = None) -> Path:
    """A checkpoint of optimizer step ``step`` at ``path``: a file, or a folder as Lightning's DeepSpeed strategy
    writes it (``checkpoint/`` with rank 0's model states, which hold Lightning's checkpoint less the weights and
    optimizer, and the optimizer shards; ``latest`` last, so without it the folder is half-written), or as its FSDP
    strategy writes a sharded state dict (the shards, then ``meta.pt``)."""
    state = {"pytorch-lightning_version": L.__version__, "global_step": step, "hyper_parameters": hparams or {},
             "loops": {"fit_loop": {}}}  # fmt: skip
    if kind == "file":
        torch.save({**state, "state_dict": {}, "optimizer_states": [], "lr_schedulers": []}, path)
        return path
    if kind == "fsdp_sharded":
        path.mkdir()
        (path / "__0_0.distcp").write_bytes(b"")
        if complete:
            torch.save(state, path / "meta.pt")
        return path
    prefix = "zero_pp_rank_0_" if kind == "deepspeed_zero3" else ""
    shards = path / "checkpoint"
    shards.mkdir(parents=True)
    torch.save({"module": {}, "ds_version": "0.19.8", **state}, shards / f"{prefix}mp_rank_00_model_states.pt")
    (shards / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    if complete:
        (path / "latest").write_text("checkpoint")
    return path


def resolve_last(folder: Path):
    """What Lightning's trainer resumes from for ``ckpt_path="last"`` with the checkpoints in ``folder``."""
    trainer = L.Trainer(callbacks=[TrainingStateCheckpoint(dirpath=str(folder))], accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    return trainer._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, "last", True, True)


def global_step(checkpoint: str) -> int:
    path = Path(checkpoint)
    return torch.load(checkpoint_states_file(path) if path.is_dir() else path, weights_only=True)["global_step"]


@pytest.mark.parametrize("kind", KINDS)
def test_last_is_the_link_to_the_newest(tmp_path, kind):
    for step in (4, 10):
        write_checkpoint(tmp_path / f"step-{step}.ckpt", kind, step)
    os.symlink("step-10.ckpt", tmp_path / "last.ckpt")
    assert resolve_last(tmp_path) == str(tmp_path / "last.ckpt")
    assert global_step(resolve_last(tmp_path)) == 10


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_link_the_highest_step(tmp_path, kind):
    for step in (4, 10):
        write_checkpoint(tmp_path / f"step-{step}.ckpt", kind, step)
    os.symlink("step-2.ckpt", tmp_path / "last.ckpt")  # its target already removed (keep_last)
    assert resolve_last(tmp_path) == str(tmp_path / "step-10.ckpt")


@pytest.mark.parametrize("kind", KINDS[1:])
def test_a_half_written_folder_is_passed_over(tmp_path, kind):
    """A run that died while writing step 6 resumes from step 4."""
    write_checkpoint(tmp_path / "step-4.ckpt", kind, 4)
    write_checkpoint(tmp_path / "step-6.ckpt", kind, 6, complete=False)
    assert resolve_last(tmp_path) == str(tmp_path / "step-4.ckpt")
    write_checkpoint(tmp_path / "last.ckpt", kind, 6, complete=False)  # keep_last 0: a copy, half-written
    assert resolve_last(tmp_path) == str(tmp_path / "step-4.ckpt")


def test_no_checkpoint_yet_starts_from_the_beginning(tmp_path):
    (tmp_path / "step-2.ckpt").mkdir()  # a folder, but not a checkpoint
    with pytest.warns(UserWarning, match="no last checkpoint available"):
        assert resolve_last(tmp_path) is None


def test_last_links_a_folder_without_symbolic_links(tmp_path, monkeypatch):
    """On a file system without links ``last.ckpt`` is a copy, of a folder too, and replaces a folder there."""

    def no_links(*args):
        raise OSError("links not supported")

    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: None))
    for step in (4, 6):
        write_checkpoint(tmp_path / f"step-{step}.ckpt", "deepspeed", step)
    last = write_checkpoint(tmp_path / "last.ckpt", "deepspeed", 2)
    monkeypatch.setattr(os, "symlink", no_links)
    for step in (4, 6):
        TrainingStateCheckpoint._link_checkpoint(trainer, str(tmp_path / f"step-{step}.ckpt"), str(last))
        assert not last.is_symlink() and global_step(str(last)) == step
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt", "step-4.ckpt", "step-6.ckpt"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_recipe_of_a_checkpoint_is_read_from_a_file_or_a_folder(tmp_path, tiny_model_dir, monkeypatch, caplog, kind):
    """A checkpoint without a recipe (written by Lightning alone): its hyper-parameters are the model section it is
    compared with; the recipe's values run, and the difference is listed."""
    chats = write_jsonl(tmp_path / "chats.jsonl", gsm8k_chats(2))
    hparams = {"_class_path": "lt_posttrain.trainers.sft.SFTModule", "name_or_path": str(tiny_model_dir),
               "_instantiator": "lightning.pytorch.cli.instantiate_module", "learning_rate": 0.000123}  # fmt: skip
    checkpoint = write_checkpoint(tmp_path / "step-4.ckpt", kind, 4, hparams=hparams)
    monkeypatch.setattr(PostTrainCLI, "_run_subcommand", lambda cli, subcommand: None)  # parsed, not run
    with caplog.at_level("INFO"):
        cli = build_cli(["fit", "--model.name_or_path", tiny_model_dir, "--data.sources", f"[{chats}]", "--ckpt_path",
                         checkpoint, "--trainer.accelerator", "cpu", "--trainer.logger", "false"])  # fmt: skip
    assert cli.model.hparams.learning_rate == 2e-5  # the recipe's (the default)
    assert "with a changed recipe: model.learning_rate 0.000123 -> 2e-05 (" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_written_but_not_yet_linked_is_the_last(tmp_path, kind):
    """A run that died after step-6 was complete but before last.ckpt was re-linked resumes from step 6."""
    for step in (4, 6):
        write_checkpoint(tmp_path / f"step-{step}.ckpt", kind, step)
    os.symlink("step-4.ckpt", tmp_path / "last.ckpt")
    assert resolve_last(tmp_path) == str(tmp_path / "step-6.ckpt")


def test_a_copy_as_last_competes_by_its_step(tmp_path):
    """On a file system without links last.ckpt is a copy: its own step decides, read from the file."""
    write_checkpoint(tmp_path / "step-4.ckpt", "file", 4)
    write_checkpoint(tmp_path / "last.ckpt", "file", 6)
    assert resolve_last(tmp_path) == str(tmp_path / "last.ckpt")
    write_checkpoint(tmp_path / "step-8.ckpt", "file", 8)
    assert resolve_last(tmp_path) == str(tmp_path / "step-8.ckpt")
    (tmp_path / "last.ckpt").write_bytes(b"not a checkpoint")
    assert resolve_last(tmp_path) == str(tmp_path / "step-8.ckpt")
