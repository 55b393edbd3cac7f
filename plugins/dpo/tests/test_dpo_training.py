"""DPO training: the loss starts at log 2 and a step widens the chosen-over-rejected margin; the step's gradient is
the mean over its pairs whatever the batching; the tiled log-probabilities are the full logits'; reference
log-probabilities read from the data, or computed before training with the reference then freed, give the live
reference's losses, resumed runs included; a recipe picks it all by short names."""

import csv
import math
import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml
from dpo_rows import gsm8k_pairs, write_jsonl
from lightning.pytorch.callbacks import ModelCheckpoint
from lt_posttrain_dpo import DPOModule, PreferenceDataModule, sequence_logps


def pairs_data(tokenizer, path, **options) -> PreferenceDataModule:
    data = PreferenceDataModule([{"name_or_path": str(path), "type": "preference_pairs"}], max_length=512,
                                shuffle=False, **options)  # fmt: skip
    data.connect(tokenizer)
    data.setup("fit")
    return data


def dpo(model_dir, **options) -> DPOModule:
    module = DPOModule(str(model_dir), beta=0.5, **options)
    module.configure_model()
    return module


def test_loss_starts_at_log_2_and_a_step_raises_the_margin(tiny_model_dir, tokenizer, pairs_file):
    batch = next(iter(pairs_data(tokenizer, pairs_file, batch_size=4).train_dataloader()))
    module = dpo(tiny_model_dir)
    losses, rewards = module.pair_losses(batch)
    assert losses.detach() == pytest.approx([math.log(2)] * 4, abs=1e-6)  # the policy is its reference
    optimizer = torch.optim.SGD(module.model.parameters(), lr=1e-3)
    losses.mean().backward()
    optimizer.step()
    with torch.no_grad():
        after, rewards = module.pair_losses(batch)
    assert (rewards[:, 0] > rewards[:, 1]).all()  # every pair's chosen answer gained on its rejected one
    assert (after < math.log(2)).all()


class FirstGradients(L.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if not hasattr(self, "grads"):
            self.grads = {name: p.grad.clone() for name, p in module.model.named_parameters() if p.grad is not None}


def fit_one_step(model_dir, tokenizer, path, batch_size, accumulate, packing) -> dict:
    capture = FirstGradients()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                        callbacks=[capture], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    data = PreferenceDataModule([{"name_or_path": str(path), "type": "preference_pairs"}], max_length=512,
                                batch_size=batch_size, packing=packing, shuffle=False)  # fmt: skip
    trainer.fit(DPOModule(str(model_dir), beta=0.5, learning_rate=1e-3), data)
    return capture.grads


def test_gradient_is_the_mean_over_the_steps_pairs(tiny_model_dir, tokenizer, tmp_path):
    """Four pairs of very different lengths: one micro-batch of 4 pairs, 4 micro-batches of 1, or 2 micro-batches of
    one packed row each (3 pairs and 1) all give the gradient of the mean loss over the 4 pairs, computed by hand."""
    short = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
             {"prompt": "Is 7 prime?", "chosen": "Yes.", "rejected": "No."}]  # fmt: skip
    path = write_jsonl(tmp_path / "pairs.jsonl", [*gsm8k_pairs(2), *short])
    module = dpo(tiny_model_dir)
    batch = next(iter(pairs_data(tokenizer, path, batch_size=4).train_dataloader()))
    module.pair_losses(batch)[0].mean().backward()
    expected = {name: p.grad for name, p in module.model.named_parameters()}
    for batch_size, accumulate, packing in [(4, 1, False), (1, 4, False), (1, 2, True)]:
        grads = fit_one_step(tiny_model_dir, tokenizer, path, batch_size, accumulate, packing)
        for name, grad in expected.items():
            error = (grads[name] - grad).abs().max() / grad.abs().max()
            assert error < 1e-5, f"{batch_size=} {accumulate=} {packing=} {name}: relative difference {error:.1e}"


def test_reference_is_kept_out_of_the_optimizer_and_checkpoints(tiny_model_dir, pairs_file, tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    data = PreferenceDataModule([{"name_or_path": str(pairs_file), "type": "preference_pairs"}], batch_size=2)
    module = DPOModule(str(tiny_model_dir), beta=0.5, learning_rate=1e-3)
    trainer.fit(module, data)
    reference = {id(p) for p in module.reference_model.parameters()}
    assert reference and not any(p.requires_grad for p in module.reference_model.parameters())
    assert not any(id(p) in reference for group in trainer.optimizers[0].param_groups for p in group["params"])
    assert not any(id(p) in reference for p in module.parameters())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert saved and all(name.startswith("model.") for name in saved)
    older = {"state_dict": {**saved, "reference_model.lm_head.weight": torch.zeros(1)}}  # as saved before
    module.on_load_checkpoint(older)
    assert older["state_dict"].keys() == saved.keys()
    module.to(torch.bfloat16)  # yet the reference moves and casts with the module
    assert {p.dtype for p in module.reference_model.parameters()} == {torch.bfloat16}


def test_precomputed_reference_gives_the_same_losses(tiny_model_dir, tokenizer, tmp_path):
    """Reference log-probabilities read from the rows give the loss of the live reference. They are scored here in
    the micro-batch the comparison uses: a sequence padded to another width sums its ~200 token log-probabilities
    (~2,000 nats) in another order, which moves the float32 sum by about its last unit (1e-4), the loss by 1e-5, and
    would test the rounding instead of the data path."""
    rows = gsm8k_pairs(4)
    module = dpo(tiny_model_dir)
    batch = next(iter(pairs_data(tokenizer, write_jsonl(tmp_path / "a.jsonl", rows), batch_size=4).train_dataloader()))
    with torch.no_grad():  # as a job that scores the pairs would write them
        for row, logps in zip(rows, module.reference_logps(batch).tolist()):
            row["reference_chosen_logp"], row["reference_rejected_logp"] = logps
    precomputed = dpo(tiny_model_dir, precomputed_reference=True)
    assert precomputed.reference_model is None
    precomputed.model.load_state_dict(module.model.state_dict())
    batch = next(iter(pairs_data(tokenizer, write_jsonl(tmp_path / "b.jsonl", rows), batch_size=4).train_dataloader()))
    assert torch.equal(batch["reference_logps"].float(), module.reference_logps(batch).float())
    with torch.no_grad():
        assert precomputed.pair_losses(batch)[0] == pytest.approx(module.pair_losses(batch)[0], abs=1e-6)


class StepLosses(L.Callback):
    """Each step's ``train/loss``, the last ``val/loss``, and whether the reference model was held during a step."""

    def __init__(self):
        self.losses, self.held = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.held.append(module.reference_model is not None)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.losses):
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


def fit(model_dir, path, max_steps: int, checkpoint=None, save_to=None, **options) -> tuple[StepLosses, L.Trainer]:
    """A fit of ``max_steps`` on ``path``'s pairs, 2 a micro-batch, in order, validated after step 3; resumed from
    ``checkpoint``; saving every 2 steps to ``save_to``."""
    losses = StepLosses()
    saving = [ModelCheckpoint(save_to, every_n_train_steps=2, save_top_k=-1)] if save_to else []
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, val_check_interval=3, logger=False,
                        callbacks=[losses, *saving], enable_checkpointing=bool(save_to), enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    data = PreferenceDataModule([{"name_or_path": str(path), "type": "preference_pairs"}], max_length=512,
                                batch_size=2, shuffle=False, val_fraction=0.25)  # fmt: skip
    trainer.fit(DPOModule(str(model_dir), beta=0.5, learning_rate=1e-3, **options), data, ckpt_path=checkpoint)
    return losses, trainer


def test_precompute_reference_gives_the_live_losses_without_holding_the_reference(tiny_model_dir, tmp_path):
    """The reference scores every training and validation pair before the first step and is then freed: the steps'
    losses and the validation loss are the live reference's, and a run resumed from a checkpoint (which scores the
    pairs again) continues with the losses of the run never stopped."""
    path = write_jsonl(tmp_path / "pairs.jsonl", gsm8k_pairs(12))
    live, live_trainer = fit(tiny_model_dir, path, 3)
    precomputed, trainer = fit(tiny_model_dir, path, 3, save_to=tmp_path / "saved", precompute_reference=True)
    assert all(live.held) and not any(precomputed.held)
    assert len(live.losses) == 3 and precomputed.losses == pytest.approx(live.losses, abs=1e-6)
    validation = float(trainer.callback_metrics["val/loss"])
    assert validation == pytest.approx(float(live_trainer.callback_metrics["val/loss"]), abs=1e-6)

    [saved] = (tmp_path / "saved").glob("*step=2.ckpt")
    resumed, resumed_trainer = fit(tiny_model_dir, path, 3, checkpoint=saved, precompute_reference=True)
    assert resumed.losses == pytest.approx(precomputed.losses[2:], abs=1e-6) and not any(resumed.held)
    assert float(resumed_trainer.callback_metrics["val/loss"]) == pytest.approx(validation, abs=1e-6)


def test_tiled_log_probabilities_are_those_of_the_full_logits(tiny_model_dir, tokenizer, pairs_file):
    """The policy's and the reference's answer log-probabilities, from the hidden states and the head a tile at a
    time, equal ``sequence_logps`` of the full logits, packed or padded."""
    module = dpo(tiny_model_dir)
    for packing in (False, True):
        batch = next(iter(pairs_data(tokenizer, pairs_file, batch_size=4, packing=packing).train_dataloader()))
        with torch.no_grad():
            full = sequence_logps(module(batch), batch).view(-1, 2)
            # each token's value agrees to an ulp or two, so a sum over ~200 tokens to about 1e-6 of itself
            assert module.policy_logps(batch) == pytest.approx(full, rel=1e-5)
            assert torch.equal(module.reference_logps(batch), module.policy_logps(batch))  # the same arithmetic


def lt_posttrain(*args):
    return subprocess.run([sys.executable, "-m", "lt_posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_recipe_with_short_names(tiny_model_dir, pairs_file, tmp_path):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"class_path": "dpo", "init_args": {"name_or_path": str(tiny_model_dir), "beta": 0.1}},
        "data": {"class_path": "preference", "init_args": {
            "sources": [{"name_or_path": str(pairs_file), "type": "preference_pairs"}], "batch_size": 2}},
        "trainer": {"accelerator": "cpu", "max_steps": 2, "log_every_n_steps": 1, "enable_checkpointing": False,
                    "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path)}}},
        "checkpoint": {"save_end_of_training": False},
    }))  # fmt: skip
    result = lt_posttrain("fit", "--config", recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    losses = [float(row["train/loss"]) for row in rows if row["train/loss"]]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert all(0 <= float(row["train/reward_accuracy"]) <= 1 for row in rows if row["train/loss"])
    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert saved["model"]["class_path"] == "lt_posttrain_dpo.trainer.DPOModule"
    assert saved["data"]["class_path"] == "lt_posttrain_dpo.datamodule.PreferenceDataModule"

    plain_data = lt_posttrain("fit", "--config", recipe, "--data", "instruct")
    assert plain_data.returncode == 2 and "Traceback" not in plain_data.stderr, plain_data.stderr[-2000:]
    error = plain_data.stderr.strip().splitlines()[-1]
    assert error.startswith("lt-posttrain: error: model dpo learns from preference pairs")
