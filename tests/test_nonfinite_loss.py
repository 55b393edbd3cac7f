"""A NaN loss stops the run in one line before the weights change, the last checkpoint intact; or, by option, the
step is skipped and counted."""

from pathlib import Path

import pytest
import torch

from cli_runs import failing_here, fit_args, logged, write_recipe
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain.cli import main
from test_cli import assert_one_line_error

NAN_TRAINER = ["--model", "nan_loss_trainer.NaNLossAtSteps"]
# torch's AdamW is fused on GPU only; fused (tests/fused_adamw.py on CPU), it skips a step on the device, found_inf
# set, and the flag is read later: on a GPU one step later, once copied to the host without waiting. In the backward
# pass the weights move as their gradients come: the loss is checked before it.
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
OPTIMIZERS = pytest.mark.parametrize(
    "optimizer",
    [
        ["adamw"],
        ["fused_adamw.FusedAdamW"],
        ["adamw_kahan", "--model.optimizer_in_backward", "true", "--trainer.accumulate_grad_batches", "1"],
        pytest.param(["adamw", "--trainer.accelerator", "gpu"], marks=GPU),
    ],
    ids=["host-check", "fused", "in-backward", "gpu-fused"],
)


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "gsm8k.jsonl", gsm8k_chats(24))


@OPTIMIZERS
def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, chats, capsys, optimizer):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, chats, trainer={"max_steps": 8},
                          training_state={"every_n_steps": 2})  # fmt: skip
    args = fit_args(recipe, tmp_path, "run", *NAN_TRAINER, "--model.nan_at_steps", "[5]", "--model.optimizer", *optimizer)
    result = failing_here(capsys, *args)
    assert_one_line_error(result, "optimizer step 5 is NaN or infinite", "before updating the weights",
                          str(tmp_path / "checkpoints" / "last.ckpt"), "nonfinite_loss.action skip")  # fmt: skip
    folder = tmp_path / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt", "step-2.ckpt", "step-4.ckpt"]
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(tensor).all() for tensor in last["state_dict"].values())


@OPTIMIZERS
def test_skip_drops_the_update_of_a_nan_step_and_counts_it(tmp_path, tiny_model_dir, chats, optimizer):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, chats, trainer={"max_steps": 4},
                          training_state={"every_n_steps": 1, "keep_last": -1})  # fmt: skip
    main(fit_args(recipe, tmp_path, "run", *NAN_TRAINER, "--model.nan_at_steps", "[3]", "--nonfinite_loss.action=skip",
                  "--model.optimizer", *optimizer))  # fmt: skip
    step = {n: torch.load(tmp_path / "checkpoints" / f"step-{n}.ckpt", weights_only=True) for n in (2, 3, 4)}
    before, skipped, after = (step[n]["state_dict"] for n in (2, 3, 4))
    assert all(torch.equal(before[name], skipped[name]) for name in before)  # step 3 changed nothing
    assert any(not torch.equal(skipped[name], after[name]) for name in skipped)  # step 4 trained again
    assert all(torch.isfinite(tensor).all() for tensor in after.values())
    assert step[3]["lr_schedulers"][0]["last_epoch"] == 3  # the schedule moved on
    counts = logged(tmp_path, "run", "train/skipped_steps")
    assert counts[0] == counts[1] == 0.0 and counts[3] == 1.0
    assert counts[2] == 1.0 or "gpu" in optimizer  # on a GPU the count may show a step late
