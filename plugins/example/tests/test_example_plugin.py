"""The example plugin: its loss is label-smoothed cross-entropy summed over loss tokens, its rows become
conversations, and both are found by their short names in a recipe."""

import csv
import subprocess
import sys

import pytest
import torch
from lt_posttrain_example import AlpacaSourceType, LabelSmoothingSFT

from lt_posttrain import InstructDataModule, Source, UserError, load_source_type


def first_batch(model_dir, alpaca_file, tokenizer) -> dict:
    data = InstructDataModule([{"name_or_path": str(alpaca_file), "type": "alpaca"}], batch_size=4, max_length=512)
    data.connect(tokenizer)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_loss_is_the_smoothed_cross_entropy_sum(tiny_model_dir, alpaca_file, tokenizer):
    """``(1 - s) * nll + s * (mean over the vocabulary of -log p)``, summed over the tokens with a target."""
    batch = first_batch(tiny_model_dir, alpaca_file, tokenizer)
    targets = batch["targets"]
    logits = torch.randn(*targets.shape, len(tokenizer))
    logits.scatter_(-1, targets.clamp(min=0).unsqueeze(-1), 8.0)  # confident in the targets: smoothing matters
    module = LabelSmoothingSFT(str(tiny_model_dir), smoothing=0.2)
    module.forward = lambda batch: logits
    kept = targets.flatten() != -100
    log_probs = logits.log_softmax(-1).flatten(0, 1)[kept]
    nll = -log_probs.gather(1, targets.flatten()[kept].unsqueeze(1)).squeeze(1)
    expected = (0.8 * nll - 0.2 * log_probs.mean(-1)).sum()
    assert module.loss(batch) == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() != pytest.approx(nll.sum().item(), rel=0.2)  # so plain cross-entropy would fail


def test_alpaca_rows_become_conversations():
    source = Source(name_or_path="alpaca.jsonl", type="alpaca", options={"system": "Be brief."})
    alpaca = load_source_type(source)
    assert isinstance(alpaca, AlpacaSourceType)
    assert alpaca.messages({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, 0) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
    ]
    with_input = alpaca.messages({"instruction": "Translate.", "input": "Hallo", "output": "Hello"}, 1)
    assert with_input[1]["content"] == "Translate.\n\nHallo"
    assert alpaca.messages({"instruction": "x", "output": None}, 2) == []
    with pytest.raises(UserError, match=r"^data source 'alpaca.jsonl', row 3: no column 'output'; alpaca rows have"):
        alpaca.messages({"instruction": "x", "answer": "y"}, 3)


def test_fit_by_short_names(tiny_model_dir, alpaca_file, tmp_path):
    """``--model label_smoothing`` and ``type: alpaca``, as a user writes them: the run trains and logs a loss."""
    result = subprocess.run(
        [sys.executable, "-m", "lt_posttrain.cli", "fit", "--model", "label_smoothing", "--model.smoothing", "0.1",
         "--model.name_or_path", str(tiny_model_dir),
         "--data.sources", f"[{{type: alpaca, name_or_path: {alpaca_file}}}]",
         "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
         "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path), "--trainer.enable_checkpointing",
         "false", "--checkpoint.save_end_of_training", "false"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    assert len([row for row in rows if row["train/loss"]]) == 2
    saved = next(tmp_path.rglob("config.yaml")).read_text()
    assert "class_path: lt_posttrain_example.trainer.LabelSmoothingSFT" in saved  # re-runnable without the registry
