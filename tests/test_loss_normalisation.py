"""One loss whatever the batching: the gradient of an optimizer step is the token-mean over the whole step."""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from cli_runs import fit, logged_losses
from conftest import gsm8k_chats, write_jsonl
from grad_capture import GradCapture
from lt_posttrain import InstructDataModule, SFTModule

SHORT = [
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
    {"messages": [{"role": "user", "content": "Is 7 prime?"}, {"role": "assistant", "content": "Yes."}]},
]


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory) -> Path:
    """Four chats: two GSM8K worked answers (~100 loss tokens) and two one-word answers (~3 loss tokens)."""
    long = [row for row in gsm8k_chats(50) if len(row["messages"][1]["content"]) > 300][:2]
    rows = [long[0], SHORT[0], long[1], SHORT[1]]
    return write_jsonl(tmp_path_factory.mktemp("data") / "uneven.jsonl", rows)


def fit_one_step(model_dir, data, batch_size, accumulate, packing, logger=False, max_steps=1, **data_kwargs):
    L.seed_everything(0)
    module = SFTModule(str(model_dir), learning_rate=1e-3)
    datamodule = InstructDataModule([str(data)], max_length=512, batch_size=batch_size, packing=packing, **data_kwargs)
    capture = GradCapture()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=accumulate, logger=logger,
        log_every_n_steps=1, callbacks=[capture], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule)
    return capture.grads[0], datamodule


def assert_same_grads(expected: dict, actual: dict, rtol=1e-6) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        scale = expected[name].abs().max().clamp(min=1e-12)
        error = (expected[name] - actual[name]).abs().max() / scale
        assert error < rtol, f"{name}: relative difference {error:.2e}"


def test_lengths_really_differ_tenfold(uneven_data, tiny_model_dir, tokenizer):
    datamodule = InstructDataModule([str(uneven_data)], max_length=512)
    datamodule.connect(tokenizer)
    datamodule.setup("fit")
    counts = datamodule.train_samples["loss_count"]
    assert max(counts) >= 10 * min(counts)


@pytest.fixture(scope="module")
def one_batch_grads(uneven_data, tiny_model_dir) -> dict:
    """The step's gradients with the four chats in one padded micro-batch."""
    return fit_one_step(tiny_model_dir, uneven_data, batch_size=4, accumulate=1, packing=False)[0]


@pytest.mark.parametrize(
    "batch_size,accumulate,packing",
    [(1, 4, False), (2, 2, False), (4, 1, True), (1, 4, True), (2, 2, True)],
)
def test_gradients_do_not_depend_on_batching(uneven_data, tiny_model_dir, one_batch_grads, batch_size, accumulate,
                                             packing):  # fmt: skip
    grads, _ = fit_one_step(tiny_model_dir, uneven_data, batch_size=batch_size, accumulate=accumulate, packing=packing)
    assert_same_grads(one_batch_grads, grads)


def test_gradient_is_token_mean_not_mean_of_means(uneven_data, tiny_model_dir, tokenizer):
    """The step's gradient equals the gradient of sum(token losses) / (loss tokens), computed with plain torch."""
    grads, datamodule = fit_one_step(tiny_model_dir, uneven_data, batch_size=1, accumulate=4, packing=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    samples = datamodule.train_samples
    total, count = 0.0, 0
    for input_ids, labels in zip(samples["input_ids"], samples["labels"]):
        out = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels]), use_cache=False)
        n = sum(label != -100 for label in labels[1:])
        total, count = total + out.loss * n, count + n
    (total / count).backward()
    expected = {f"model.{name}": p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert_same_grads(expected, grads, rtol=1e-5)


def test_logged_train_loss_is_the_token_weighted_mean(uneven_data, tiny_model_dir, tmp_path):
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    _, datamodule = fit_one_step(
        tiny_model_dir, uneven_data, batch_size=2, accumulate=2, packing=True, logger=logger, shuffle=False
    )
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        logged = [float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sums, count = 0.0, 0
    with torch.no_grad():
        for input_ids, labels in zip(datamodule.train_samples["input_ids"], datamodule.train_samples["labels"]):
            logits = model(input_ids=torch.tensor([input_ids]), use_cache=False).logits[0, :-1]
            targets = torch.tensor(labels[1:])
            keep = targets != -100
            sums += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    assert logged and logged[0] == pytest.approx(sums / count, rel=1e-5)


def cli_fit_args(model_dir, data, devices: int, batch_size: int, max_steps: int, root: Path) -> list[str]:
    """A ``fit`` on ``devices`` gloo ranks (one process when 1) with micro-batches of ``batch_size`` per rank."""
    return [
        f"--model.name_or_path={model_dir}", f"--data.sources=[{data}]", f"--data.batch_size={batch_size}",
        "--data.max_length=512", "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
        "--trainer.strategy=ddp" if devices > 1 else "--trainer.strategy=auto", f"--trainer.max_steps={max_steps}",
        "--trainer.max_epochs=-1", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--checkpoint.save_end_of_training=false", f"--trainer.default_root_dir={root}",
    ]  # fmt: skip


def test_two_process_ddp_matches_one_process(uneven_data, tiny_model_dir, tmp_path):
    """Two gloo ranks with micro-batch 2 give the gradients of one process with micro-batch 4, and over three
    optimizer steps (three epochs of the four uneven chats) log its losses, so the updates between the steps agree
    too (real CLI runs; one pair of runs checks both)."""

    def cli_run(devices: int, batch_size: int) -> tuple[dict, list[float]]:
        grads, logs = tmp_path / f"grads-{devices}.pt", tmp_path / f"logs-{devices}"
        fit(tmp_path, *cli_fit_args(tiny_model_dir, uneven_data, devices, batch_size, 3, tmp_path),
            "--model.learning_rate=1e-3", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={logs}",
            "--trainer.log_every_n_steps=1", "--trainer.callbacks+=grad_capture.GradCapture",
            f"--trainer.callbacks.path={grads}")  # fmt: skip
        return torch.load(grads), logged_losses(logs)

    (one_grads, one), (two_grads, two) = cli_run(1, 4), cli_run(2, 2)
    assert_same_grads(one_grads, two_grads)  # of the first step
    assert len(one) == 3 and one[2] < one[0]  # it trains: the same updates are what make the later steps agree
    assert two == pytest.approx(one, rel=1e-5)


def test_sample_weights_scale_losses_but_not_the_normaliser(uneven_data, tiny_model_dir, tmp_path):
    rows = [json.loads(line) for line in uneven_data.read_text().splitlines()]
    weights = [2.0, 1.0, 0.5, 3.0]
    weighted = write_jsonl(tmp_path / "weighted.jsonl", [{**row, "weight": w} for row, w in zip(rows, weights)])
    grads, datamodule = fit_one_step(tiny_model_dir, weighted, batch_size=1, accumulate=4, packing=False)
    packed, _ = fit_one_step(tiny_model_dir, weighted, batch_size=2, accumulate=1, packing=True)
    assert_same_grads(grads, packed)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    samples = datamodule.train_samples
    assert samples["weight"] == weights
    total, count = 0.0, 0
    for input_ids, labels, weight in zip(samples["input_ids"], samples["labels"], samples["weight"]):
        out = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels]), use_cache=False)
        n = sum(label != -100 for label in labels[1:])
        total, count = total + weight * out.loss * n, count + n
    (total / count).backward()
    expected = {f"model.{name}": p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert_same_grads(expected, grads, rtol=1e-5)
