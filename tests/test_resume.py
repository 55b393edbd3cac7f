"""Exact resume: a run killed at any point and resumed with ``--ckpt_path last`` logs the losses of a run never
stopped; checkpoints are complete, kept to the last K, read weights-only, and never left half-written."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from cli_runs import epochs_of, failing_here, fit_args, fit_in_own_process, logged, write_recipe
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain.callbacks.random_state import capture_random_states, restore_random_states
from lt_posttrain.cli import main
from lt_posttrain.data.plan import PlanSampler, plan_epoch
from lt_posttrain.errors import UserError
from test_cli import assert_one_line_error

SIGKILL_STATUS = -9


def make_packs(count: int) -> tuple[list[list[int]], list[int]]:
    packs = [[2 * n, 2 * n + 1] for n in range(count)]
    return packs, [1 + (n % 5) for n in range(2 * count)]


# ---------------------------------------------------------------- the sampler's position in its epoch


@pytest.mark.parametrize("epoch,taken", [(0, 0), (0, 4), (3, 7)])
def test_plan_sampler_resumes_at_the_next_micro_batch(epoch, taken):
    packs, loss_counts = make_packs(30)
    before = PlanSampler(packs, loss_counts, batch_size=2, accumulate=2, seed=5)
    before.set_epoch(epoch)
    iterator = iter(before)
    seen = [next(iterator) for _ in range(taken)]
    state = before.state_dict()
    after = PlanSampler(packs, loss_counts, batch_size=2, accumulate=2, seed=5)
    after.load_state_dict(state)
    after.set_epoch(epoch)  # what Lightning does after loading, before the first batch
    expected = plan_epoch(packs, loss_counts, batch_size=2, accumulate=2, seed=5, epoch=epoch)
    assert seen + list(after) == expected
    assert list(after) == expected  # the position applies to one iteration only


def test_plan_sampler_state_of_a_finished_epoch_starts_the_next():
    packs, loss_counts = make_packs(12)
    before = PlanSampler(packs, loss_counts, batch_size=3, seed=1)
    before.set_epoch(2)
    assert len(list(before)) == len(before)
    after = PlanSampler(packs, loss_counts, batch_size=3, seed=1)
    after.load_state_dict(before.state_dict())
    assert after.epoch == 3
    assert list(after) == plan_epoch(packs, loss_counts, batch_size=3, seed=1, epoch=3)


def test_plan_sampler_state_between_epochs_is_the_start_of_the_new_one():
    """Lightning sets the next epoch before it starts iterating: a checkpoint in between starts that epoch."""
    packs, loss_counts = make_packs(12)
    sampler = PlanSampler(packs, loss_counts, batch_size=3, seed=1)
    list(sampler)
    sampler.set_epoch(1)
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["yielded"] == 0


@pytest.mark.parametrize(
    "change,named",
    [
        ({"batch_size": 3}, "data.batch_size 2, now 3"),
        ({"seed": 6}, "data.seed 5, now 6"),
        ({"world_size": 2}, "ranks 1, now 2"),
    ],
)
def test_plan_sampler_refuses_the_state_of_another_plan(change, named):
    packs, loss_counts = make_packs(30)
    settings = dict(batch_size=2, accumulate=2, seed=5)
    state = PlanSampler(packs, loss_counts, **settings).state_dict()
    with pytest.raises(UserError, match="another data plan") as error:
        PlanSampler(packs, loss_counts, **{**settings, **change}).load_state_dict(state)
    assert named in str(error.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_loader_saves_the_sampler_position(num_workers):
    """torchdata's loader carries the sampler's state (with workers too), as Lightning saves it in a checkpoint; a
    resumed run's loader starts from a new sampler, whose epoch Lightning sets only after the iterator exists."""
    packs, loss_counts = make_packs(20)

    def loader():
        sampler = PlanSampler(packs, loss_counts, batch_size=2, seed=3)
        return StatefulDataLoader(RowsOf(), sampler=sampler, batch_size=None, num_workers=num_workers)

    first = loader()
    first.sampler.set_epoch(1)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(4)]
    state = first.state_dict()
    rest = list(iterator)
    second = loader()
    second.load_state_dict(state)
    resumed = iter(second)
    second.sampler.set_epoch(1)
    assert list(resumed) == rest
    assert len(seen) + len(rest) == len(first)


class RowsOf:
    """A map-style data set indexed by micro-batches: returns their packs."""

    def __getitem__(self, micro_batch):
        return micro_batch.packs


# ---------------------------------------------------------------- random states


def test_random_states_survive_a_weights_only_round_trip(tmp_path):
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    draw()
    torch.save({"states": capture_random_states()}, tmp_path / "states.pt")
    expected = draw()
    draw()
    restore_random_states(torch.load(tmp_path / "states.pt", weights_only=True)["states"])
    assert draw() == expected


# ---------------------------------------------------------------- killed and resumed through the command line


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "gsm8k.jsonl", gsm8k_chats(16))


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama with attention dropout: its losses depend on the random state, which a resume must restore."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-llama-dropout")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_killed_and_resumed_runs_log_the_losses_of_an_uninterrupted_one(tmp_path, dropout_model_dir, chats):
    """Packing, shuffling, accumulation, dropout and validation on; killed with SIGKILL at the end of an epoch, right
    after a resume, and in the middle of an epoch, each run in a process of its own. Every loss any run logs equals
    the uninterrupted run's."""
    recipe = write_recipe(
        tmp_path / "recipe.yaml", dropout_model_dir, chats, model={"attn_implementation": "sdpa"},
        data={"val_fraction": 0.125}, trainer={"max_epochs": 2, "val_check_interval": 6},
        training_state={"every_n_steps": 1, "keep_last": 2},
    )  # fmt: skip
    result = fit_in_own_process(recipe, tmp_path / "uninterrupted", "run", "--trainer.enable_checkpointing", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = logged(tmp_path / "uninterrupted", "run")
    epochs = epochs_of(tmp_path / "uninterrupted", "run")
    steps_per_epoch = sum(1 for epoch in epochs.values() if epoch == 0)
    assert len(expected) == 2 * steps_per_epoch and steps_per_epoch >= 4
    assert logged(tmp_path / "uninterrupted", "run", "val/loss")

    root = tmp_path / "interrupted"
    end_of_epoch, middle_of_epoch = steps_per_epoch, steps_per_epoch + steps_per_epoch // 2
    # A run dies once step N is done, before its checkpoint and its log line: the next resumes from step N - 1.
    for name, dies_after, resume in [("first", end_of_epoch + 1, False), ("second", end_of_epoch + 1, True),
                                     ("third", middle_of_epoch + 1, True)]:  # fmt: skip
        kill = ["--trainer.callbacks+=kill_at_step.KillAtStep", f"--trainer.callbacks.step={dies_after}"]
        result = fit_in_own_process(recipe, root, name, *kill, *(["--ckpt_path", "last"] if resume else []))
        assert result.returncode == SIGKILL_STATUS, result.stderr[-3000:]
    result = fit_in_own_process(recipe, root, "last", "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]

    runs = {name: logged(root, name) for name in ("first", "second", "third", "last")}
    assert runs["second"] == {}  # it died after its first step, unlogged (a resumed run writes no checkpoint then)
    assert min(runs["third"]) == end_of_epoch  # Lightning logs step k + 1 as k: resumed at the epoch's end
    assert min(runs["last"]) == middle_of_epoch
    for name, losses in runs.items():
        assert losses == {step: expected[step] for step in losses}, name
    assert set().union(*runs.values()) == set(expected)


# ---------------------------------------------------------------- what a checkpoint holds, and failed writes


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, chats) -> tuple[Path, Path]:
    """A 5-step run writing a checkpoint every 2 steps, keeping 2: ``(recipe, run folder)``."""
    root = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(root / "recipe.yaml", tiny_model_dir, chats, trainer={"max_steps": 5},
                          training_state={"every_n_steps": 2, "keep_last": 2})  # fmt: skip
    main(fit_args(recipe, root, "run"))
    return recipe, root


def test_checkpoints_every_n_steps_and_at_the_end_keep_the_last_k(finished_run):
    _, root = finished_run
    folder = root / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt", "step-4.ckpt", "step-5.ckpt"]
    assert (folder / "last.ckpt").resolve() == (folder / "step-5.ckpt").resolve()


def test_a_checkpoint_holds_everything_to_resume_and_loads_weights_only(finished_run):
    _, root = finished_run
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 5
    assert checkpoint["optimizer_states"][0]["state"]  # AdamW's moments
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 5
    (states,) = checkpoint["random_states"]  # one per rank
    assert {"python", "numpy", "torch"} <= set(states)
    (loader,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    sampler = loader["_index_sampler_state"]
    assert (sampler["epoch"], sampler["yielded"]) == (0, 10)  # 5 steps of 2 micro-batches
    assert sampler["plan"]["accumulate"] == 2


def test_a_failed_checkpoint_write_leaves_the_previous_ones_loadable(finished_run):
    """A run resumed from step 4 in the same folder, its disk "full" (files capped at 4 MB), fails in one line on its
    checkpoint at the end, half-way through replacing step-5.ckpt; every earlier file is as it was."""
    recipe, root = finished_run
    folder = root / "checkpoints"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    result = fit_in_own_process(recipe, root, "full-disk", "--ckpt_path", folder / "step-4.ckpt",
                                limit_file_size=4 * 2**20)  # fmt: skip
    assert_one_line_error(result, "cannot write checkpoint", "step-5.ckpt", "File too large", "intact")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # no partial file either
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 5


def test_resuming_with_other_batching_is_refused(finished_run, capsys):
    recipe, root = finished_run
    resume = ("--ckpt_path", "last", "--data.batch_size", 2)
    result = failing_here(capsys, *fit_args(recipe, root, "other-batching", *resume))
    assert_one_line_error(result, "another data plan", "data.batch_size 1, now 2")
