"""Reward model training: the step's gradient is the mean over its pairs whatever the batching; a recipe with the
short names trains, logs the validation accuracy, and exports a model that ``AutoModelForSequenceClassification``
loads and that scores a conversation as training did; wrong settings are one-line errors."""

import csv
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lt_posttrain_reward import RewardDataModule, RewardModule
from reward_rows import SHORT_PAIRS, gsm8k_pairs, reward_data, write_jsonl


class FirstGradients(L.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if not hasattr(self, "grads"):
            self.grads = {name: p.grad.clone() for name, p in module.model.named_parameters() if p.grad is not None}


def fit_one_step(model_dir, path, batch_size, accumulate, packing, static_shapes=False) -> dict:
    capture = FirstGradients()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                        callbacks=[capture], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    source = {"name_or_path": str(path), "type": "reward_pairs"}
    data = RewardDataModule([source], max_length=512, batch_size=batch_size, packing=packing, shuffle=False,
                            static_shapes=static_shapes)
    trainer.fit(RewardModule(str(model_dir), learning_rate=1e-3, center_rewards_coefficient=0.01), data)
    return capture.grads


def test_gradient_is_the_mean_over_the_steps_pairs(reward_model_dir, tokenizer, tmp_path):
    """Four pairs of very different lengths (two with a margin): one micro-batch of 4 pairs, 4 accumulated
    micro-batches of 1, 2 of 2 (as static shapes), or 2 of one packed row each all give the gradient of the mean loss
    over the 4, computed by hand."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [*gsm8k_pairs(2), *SHORT_PAIRS])
    module = RewardModule(str(reward_model_dir), center_rewards_coefficient=0.01)
    module.configure_model()
    batch = next(iter(reward_data(tokenizer, path, batch_size=4).train_dataloader()))
    module.pair_losses(batch)[0].mean().backward()
    expected = {name: p.grad for name, p in module.model.named_parameters()}
    for batch_size, accumulate, packing, static in [(4, 1, False, False), (1, 4, False, False), (2, 2, False, True),
                                                    (1, 2, True, False)]:  # fmt: skip
        grads = fit_one_step(reward_model_dir, path, batch_size, accumulate, packing, static)
        for name, grad in expected.items():
            error = (grads[name] - grad).abs().max() / grad.abs().max()
            where = f"{batch_size=} {accumulate=} {packing=} {static=} {name}"
            assert error < 1e-5, f"{where}: relative difference {error:.1e}"


def test_recipe_trains_and_exports_a_model_that_scores_a_conversation(tiny_model_dir, tokenizer, tmp_path):
    """``model: reward`` from a causal LM (a new head), ``data: reward``, ``type: reward_pairs``: two steps, the
    validation accuracy logged, and the export loads with ``AutoModelForSequenceClassification`` and gives a
    conversation the reward the trained module gives it."""
    from transformers import AutoModelForSequenceClassification

    rows = write_jsonl(tmp_path / "pairs.jsonl", gsm8k_pairs(10))
    recipe = tmp_path / "reward.yaml"
    recipe.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "model": {"class_path": "reward", "init_args": {"name_or_path": str(tiny_model_dir), "learning_rate": 1e-3}},
        "data": {"class_path": "reward", "init_args": {
            "sources": [{"name_or_path": str(rows), "type": "reward_pairs"}], "batch_size": 2, "val_fraction": 0.2}},
        "trainer": {"accelerator": "cpu", "max_steps": 2, "log_every_n_steps": 1, "val_check_interval": 2,
                    "default_root_dir": str(tmp_path / "run"), "enable_checkpointing": False,
                    "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path)}}},
        "checkpoint": {"output_dir": str(tmp_path / "hf_model")},
    }))  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "lt_posttrain.cli", "fit", "--config", str(recipe)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    assert len([row for row in metrics if row["train/loss"]]) == 2
    assert all(0 <= float(row["train/accuracy"]) <= 1 for row in metrics if row["train/loss"])
    [accuracy] = [float(row["val/accuracy"]) for row in metrics if row.get("val/accuracy")]
    assert accuracy in (0.0, 0.5, 1.0)  # two validation pairs

    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf_model", dtype=torch.float32)
    assert type(exported).__name__ == "LlamaForSequenceClassification" and exported.config.num_labels == 1
    trained = RewardModule(str(tmp_path / "hf_model"))
    trained.configure_model()
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    batch = next(iter(reward_data(tokenizer, write_jsonl(tmp_path / "one.jsonl", [SHORT_PAIRS[0]]),
                                  batch_size=1).train_dataloader()))  # fmt: skip
    assert batch["input_ids"][0].tolist() == ids  # the data renders a conversation as the chat template does
    with torch.no_grad():
        score = float(exported(input_ids=torch.tensor([ids])).logits)
        assert float(trained.rewards(batch)[0]) == pytest.approx(score, abs=1e-5)
    assert trained.model.score.weight.abs().sum() > 0


def test_wrong_data_and_settings_are_one_line_errors(reward_model_dir, tokenizer, tmp_path):
    """The command line prints a ``UserError`` as one line (exit status 2)."""
    from lt_posttrain import InstructDataModule, UserError

    rows = write_jsonl(tmp_path / "pairs.jsonl", SHORT_PAIRS)
    module = RewardModule(str(reward_model_dir))
    module._trainer = SimpleNamespace(datamodule=InstructDataModule([str(rows)]))
    with pytest.raises(UserError, match="^model reward learns from preference pairs: set data.class_path to reward"):
        module.setup("fit")
    with pytest.raises(UserError, match="^model reward scores conversations and generates no text"):
        module.setup("predict")
    with pytest.raises(UserError, match="^model reward: LoRA and k-bit loading are not supported"):
        RewardModule(str(reward_model_dir), lora={"r": 4})
    with pytest.raises(UserError, match="^model.center_rewards_coefficient must be 0 or above"):
        RewardModule(str(reward_model_dir), center_rewards_coefficient=-1.0)
    with pytest.raises(UserError, match="'margin' must be a finite number"):
        write_jsonl(rows, [{**SHORT_PAIRS[0], "margin": "high"}])
        reward_data(tokenizer, rows)
