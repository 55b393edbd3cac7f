"""ORPO and SimPO training: a step widens every pair's chosen-over-rejected margin; the step's gradient is the mean
over its pairs whatever the batching; recipes pick the trainers by short name."""

import csv
import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml
from lt_posttrain_dpo import PreferenceDataModule
from lt_posttrain_reference_free import ORPOModule, SimPOModule
from reference_free_rows import SHORT_PAIRS, gsm8k_pairs, pairs_data, write_jsonl


@pytest.mark.parametrize("trainer", [ORPOModule, SimPOModule])
def test_a_step_raises_every_pairs_margin(trainer, tiny_model_dir, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [*gsm8k_pairs(2), *SHORT_PAIRS])
    batch = next(iter(pairs_data(tokenizer, path, batch_size=4, packing=True).train_dataloader()))
    module = trainer(str(tiny_model_dir))
    module.configure_model()
    before, rewards = module.pair_losses(batch)
    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.5)
    before.mean().backward()
    optimizer.step()
    with torch.no_grad():
        after, after_rewards = module.pair_losses(batch)
    margins = rewards[:, 0] - rewards[:, 1]
    assert ((after_rewards[:, 0] - after_rewards[:, 1]) > margins).all()
    assert after.mean() < before.mean()


class FirstGradients(L.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if not hasattr(self, "grads"):
            self.grads = {name: p.grad.clone() for name, p in module.model.named_parameters() if p.grad is not None}


def fit_one_step(model_dir, path, batch_size: int, accumulate: int, packing: bool) -> dict:
    capture = FirstGradients()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                        callbacks=[capture], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    data = PreferenceDataModule([{"name_or_path": str(path), "type": "preference_pairs"}], max_length=512,
                                batch_size=batch_size, packing=packing, shuffle=False)  # fmt: skip
    trainer.fit(ORPOModule(str(model_dir), beta=0.5, learning_rate=1e-3), data)
    return capture.grads


def test_gradient_is_the_mean_over_the_steps_pairs(tiny_model_dir, tokenizer, tmp_path):
    """Four pairs of very different lengths, ORPO with its supervised term over the prompt too (the term whose
    token count differs most between pairs): 4 pairs in one micro-batch, 1 pair in each of 4 accumulated
    micro-batches, or 2 micro-batches of up to 2 packed rows each all give the gradient of the mean loss over the 4
    pairs, computed by hand."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [*gsm8k_pairs(2), *SHORT_PAIRS])
    module = ORPOModule(str(tiny_model_dir), beta=0.5)
    module.configure_model()
    batch = next(iter(pairs_data(tokenizer, path, batch_size=4).train_dataloader()))
    module.pair_losses(batch)[0].mean().backward()
    expected = {name: p.grad for name, p in module.model.named_parameters()}
    for batch_size, accumulate, packing in [(4, 1, False), (1, 4, False), (2, 2, True)]:
        grads = fit_one_step(tiny_model_dir, path, batch_size, accumulate, packing)
        for name, grad in expected.items():
            error = (grads[name] - grad).abs().max() / grad.abs().max()
            assert error < 1e-5, f"{batch_size=} {accumulate=} {packing=} {name}: relative difference {error:.1e}"


def lt_posttrain(*args):
    return subprocess.run([sys.executable, "-m", "lt_posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_recipe_with_short_names(tiny_model_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", gsm8k_pairs(4))
    recipe = tmp_path / "orpo.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"class_path": "orpo", "init_args": {"name_or_path": str(tiny_model_dir), "beta": 0.1}},
        "data": {"class_path": "preference", "init_args": {
            "sources": [{"name_or_path": str(pairs), "type": "preference_pairs"}], "batch_size": 2}},
        "trainer": {"accelerator": "cpu", "max_steps": 2, "log_every_n_steps": 1, "enable_checkpointing": False,
                    "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path)}}},
        "checkpoint": {"save_end_of_training": False},
    }))  # fmt: skip
    result = lt_posttrain("fit", "--config", recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [row for row in csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()) if row["train/loss"]]
    assert len(rows) == 2 and all(0 <= float(row["train/reward_accuracy"]) <= 1 for row in rows)
    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert saved["model"]["class_path"] == "lt_posttrain_reference_free.trainer.ORPOModule"

    plain_data = lt_posttrain("fit", "--config", recipe, "--model", "simpo", "--data", "instruct")
    assert plain_data.returncode == 2 and "Traceback" not in plain_data.stderr, plain_data.stderr[-2000:]
    error = plain_data.stderr.strip().splitlines()[-1]
    assert error.startswith("lt-posttrain: error: model simpo learns from preference pairs")
