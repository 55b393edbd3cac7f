"""KTO training: the step's gradient is the mean over its answers, with the KL estimate of the whole step, whatever
the batching (TRL's per-micro-batch estimate would change it); the loss starts at 1/2 when the model is its own
reference; a recipe picks it all by short names, and the wrong data module is one line."""

import csv
import math
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from kto_rows import SHORT_ROWS, gsm8k_rows, labelled_data, write_jsonl
from lt_posttrain_kto import KTOModule, UnpairedPreferenceDataModule


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tokenizer):
    """Another tiny Llama (other random weights) as the reference, so the KL estimate is not 0."""
    from lt_posttrain.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("other-llama"), tokenizer, seed=1)


class FirstStep(L.Callback):
    """The first optimizer step's gradients and its logged KL estimate."""

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if not hasattr(self, "grads"):
            self.grads = {name: p.grad.clone() for name, p in module.model.named_parameters() if p.grad is not None}
            self.kl = float(module._step_kl)


def fit_one_step(model_dir, reference_dir, path, batch_size, accumulate, packing) -> FirstStep:
    capture = FirstStep()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                        callbacks=[capture], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    source = {"name_or_path": str(path), "type": "labelled_completions"}
    data = UnpairedPreferenceDataModule([source], max_length=512, batch_size=batch_size, packing=packing, shuffle=False)
    module = KTOModule(str(model_dir), reference_name_or_path=str(reference_dir), beta=0.5, learning_rate=1e-3)
    trainer.fit(module, data)
    assert not any(p.requires_grad for p in module.reference_model.parameters())
    reference = {id(p) for p in module.reference_model.parameters()}
    assert not any(id(p) in reference for group in trainer.optimizers[0].param_groups for p in group["params"])
    return capture


def test_gradient_is_the_mean_over_the_steps_answers(tiny_model_dir, other_model_dir, tokenizer, tmp_path):
    """Four answers of very different lengths, two desirable and two not: one micro-batch of 4, 4 accumulated
    micro-batches of 1, 2 of 2, or 2 of one packed row each all give the gradient of the mean loss over the 4 with
    the KL estimate over the step's 4 mismatched pairs, computed by hand on one micro-batch."""
    path = write_jsonl(tmp_path / "rows.jsonl", [*gsm8k_rows(2), *SHORT_ROWS])
    module = KTOModule(str(tiny_model_dir), reference_name_or_path=str(other_model_dir), beta=0.5)
    module.configure_model()
    whole = next(iter(labelled_data(tokenizer, path, batch_size=4).train_dataloader()))
    losses, _, kl = module.answer_losses(whole, training=False)
    losses.mean().backward()
    expected = {name: p.grad for name, p in module.model.named_parameters()}
    with torch.no_grad():  # TRL's estimate, per micro-batch, would differ with the batching
        alone = [float(module.answer_losses(batch, training=False)[2])
                 for batch in labelled_data(tokenizer, path, batch_size=1).train_dataloader()]  # fmt: skip
        # z0 is a mean of differences of float32 sums of hundreds of nats, summed in another order in each batching:
        # it agrees to two of float32's spacings there (see test_kto_loss.py)
        spacing = torch.finfo(torch.float32).eps * float(module.policy_logps(whole).abs().max())
    assert float(kl) > 0.01 and all(abs(value - float(kl)) > 1e-3 for value in alone)
    for batch_size, accumulate, packing in [(4, 1, False), (1, 4, False), (2, 2, False), (1, 2, True)]:
        step = fit_one_step(tiny_model_dir, other_model_dir, path, batch_size, accumulate, packing)
        assert step.kl == pytest.approx(float(kl), abs=2 * spacing)
        for name, grad in expected.items():
            error = (step.grads[name] - grad).abs().max() / grad.abs().max()
            assert error < 1e-5, f"{batch_size=} {accumulate=} {packing=} {name}: relative difference {error:.1e}"


def lt_posttrain(*args):
    return subprocess.run([sys.executable, "-m", "lt_posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_recipe_with_short_names(tiny_model_dir, tmp_path):
    """``model: kto``, ``data: unpaired_preference``, ``type: labelled_completions``: the model is its own
    reference, so the loss starts at 1/2 and the KL estimate at 0; validation logs its loss and estimate."""
    rows = write_jsonl(tmp_path / "rows.jsonl", gsm8k_rows(10))
    recipe = tmp_path / "kto.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"class_path": "kto", "init_args": {"name_or_path": str(tiny_model_dir), "beta": 0.1}},
        "data": {"class_path": "unpaired_preference", "init_args": {
            "sources": [{"name_or_path": str(rows), "type": "labelled_completions"}], "batch_size": 2,
            "val_fraction": 0.2}},
        "trainer": {"accelerator": "cpu", "max_steps": 2, "log_every_n_steps": 1, "enable_checkpointing": False,
                    "val_check_interval": 2,
                    "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path)}}},
        "checkpoint": {"save_end_of_training": False},
    }))  # fmt: skip
    result = lt_posttrain("fit", "--config", recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    losses = [float(row["train/loss"]) for row in rows if row["train/loss"]]
    assert len(losses) == 2 and losses[0] == pytest.approx(0.5, abs=1e-6)
    assert [float(row["train/kl"]) for row in rows if row["train/loss"]][0] == 0
    assert any(row.get("val/loss") for row in rows) and any(row.get("val/kl") for row in rows)
    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert saved["model"]["class_path"] == "lt_posttrain_kto.trainer.KTOModule"
    assert saved["data"]["class_path"] == "lt_posttrain_kto.datamodule.UnpairedPreferenceDataModule"

    assert not math.isnan(losses[-1])


def test_wrong_data_and_settings_are_one_line_errors(tiny_model_dir, tmp_path):
    """The command line prints a ``UserError`` as one line (exit status 2): the plain data module, a step of one
    answer (its KL estimate would be its own reward), static shapes."""
    from lt_posttrain import InstructDataModule, UserError

    def setup(data, accumulate=1, world_size=1):
        module = KTOModule(str(tiny_model_dir))
        module._trainer = SimpleNamespace(datamodule=data, accumulate_grad_batches=accumulate, world_size=world_size)
        module.setup("fit")

    rows = write_jsonl(tmp_path / "rows.jsonl", SHORT_ROWS)
    with pytest.raises(UserError, match="^model kto learns from labelled answers: set data.class_path to unpaired"):
        setup(InstructDataModule([str(rows)]))
    labelled = UnpairedPreferenceDataModule([{"name_or_path": str(rows), "type": "labelled_completions"}], batch_size=1)
    with pytest.raises(UserError, match="^model kto: an optimizer step of one answer"):
        setup(labelled)
    setup(labelled, accumulate=2)
    setup(labelled, world_size=2)
    with pytest.raises(UserError, match="^data.static_shapes: KTO's mismatched sequences"):
        UnpairedPreferenceDataModule([{"name_or_path": str(rows), "type": "labelled_completions"}],
                                     static_shapes=True).setup("fit")  # fmt: skip
