"""A resume with a changed recipe: the recipe's learning rate, weight decay and schedule apply from the restored step
(after the checkpoint's optimizer and schedule states are loaded), one line at the start lists every difference from
the checkpoint's recipe, and a change a resume cannot make is one line before anything is written."""

import os

import pytest
import torch

from cli_runs import failing_here, fit_args, logged, write_recipe
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain.cli import main
from lt_posttrain.training.optimizer import build_schedule
from test_cli import assert_one_line_error


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", gsm8k_chats(16))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_model_dir, chats):
    """Four steps at learning rate 1e-3 (warm-up 2, cosine over 4 steps), a checkpoint every 2: ``(recipe, root)``."""
    root = tmp_path_factory.mktemp("stopped")
    recipe = write_recipe(root / "recipe.yaml", tiny_model_dir, chats, trainer={"max_steps": 4},
                          training_state={"every_n_steps": 2})  # fmt: skip
    main(fit_args(recipe, root, "first"))
    return recipe, root


def schedule_rate(learning_rate: float, schedule: str, warmup: int, total: int, step: int) -> float:
    """The learning rate at ``step`` of the schedule a fresh run of that recipe builds."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    scheduler = build_schedule(optimizer, schedule, warmup, total)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


def tree(folder):
    return {str(path.relative_to(folder)): (os.readlink(path) if path.is_symlink() else path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_file() or path.is_symlink()}  # fmt: skip


def test_a_resume_takes_the_recipes_learning_rate_and_schedule(stopped_run, caplog):
    recipe, root = stopped_run
    changes = ("--model.learning_rate", "1e-4", "--model.schedule", "linear", "--model.warmup", "0",
               "--model.weight_decay", "0.1", "--trainer.max_steps", "7")  # fmt: skip
    with caplog.at_level("INFO"):
        main(fit_args(recipe, root, "resumed", "--ckpt_path", "last", *changes))
    [line] = [record.getMessage() for record in caplog.records if "with a changed recipe" in record.getMessage()]
    assert line.startswith(f"resuming from step 4 of {root / 'checkpoints' / 'last.ckpt'} with a changed recipe: ")
    for change in ("model.learning_rate 0.001 -> 0.0001", "model.schedule 'cosine' -> 'linear'",
                   "model.warmup 2.0 -> 0.0", "model.weight_decay 0.0 -> 0.1", "trainer.max_steps 4 -> 7"):  # fmt: skip
        assert change in line
    assert "trainer.logger" in line  # every difference is listed, the log folder's name too
    rates = logged(root, "resumed", "train/lr")
    assert sorted(rates) == [4, 5, 6]  # the steps trained after the resume
    for step, rate in rates.items():  # the new schedule, continued at the checkpoint's step
        assert rate == pytest.approx(schedule_rate(1e-4, "linear", 0, 7, step), rel=1e-6), step
    assert rates[4] == pytest.approx(1e-4 * 3 / 7, rel=1e-6)
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 7
    groups = last["optimizer_states"][0]["param_groups"]
    assert [group["initial_lr"] for group in groups] == [1e-4, 1e-4]
    assert [group["weight_decay"] for group in groups] == [0.1, 0.0]  # decay on matrices only, as the recipe built it
    assert last["lr_schedulers"][0]["base_lrs"] == [1e-4, 1e-4]
    assert last["recipe"]["model"]["init_args"]["learning_rate"] == 1e-4  # the recipe it was written with


@pytest.mark.parametrize(
    "option,value,fixed",
    [
        ("--model.optimizer", "adamw_kahan", "model.optimizer 'auto', the recipe says 'adamw_kahan'"),
        ("--model.lora", "{r: 4}", "model.lora None, the recipe says {'r': 4"),
        ("--model.dtype", "bfloat16", "model.dtype 'float32', the recipe says 'bfloat16'"),
        ("--trainer.precision", "bf16-true", "trainer.precision None, the recipe says 'bf16-true'"),
    ],
)
def test_a_change_a_resume_cannot_make_is_one_line(stopped_run, capsys, option, value, fixed):
    recipe, root = stopped_run
    before = tree(root)
    result = failing_here(capsys, *fit_args(recipe, root, "refused", "--ckpt_path", "last", option, value))
    assert_one_line_error(result, f"--ckpt_path {root / 'checkpoints'}", fixed, "a resume cannot change",
                          "resume with the checkpoint's value, or start a new run in another trainer.default_root_dir")
    assert tree(root) == before
