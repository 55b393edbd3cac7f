"""What a run prints: its own lines first (no library notes), progress as lines when the output is a file, a bar on
a terminal that ends at ``max_steps``, and one line for malformed data."""

import csv
import re
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from cli_runs import run_in_own_process
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain.callbacks.progress import StepsBar

ROOT = Path(__file__).resolve().parents[1]

# Paragraphs the libraries print about themselves at every run (lightning, deepspeed, torchao, torch, torchdata,
# datasets, transformers), none of which concerns the run
LIBRARY_NOTES = [
    "tensorboardX", "Tip:", "litlogger", "Total FLOPs", "deprecated", "Failed to load", "Setting accelerator to CPU",
    "TPU available", "Generating train split", "Loading weights", "Writing model shards", "UserWarning", "Warning:",
]  # fmt: skip


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, tiny_model_dir):
    """The quickstart recipe on the tiny model, 4 steps, output to a file as under nohup or SLURM."""
    root = tmp_path_factory.mktemp("quickstart")
    chats = write_jsonl(root / "chats.jsonl", gsm8k_chats(40))
    result = run_in_own_process(
        "fit", "--config", ROOT / "configs" / "quickstart.yaml", "--model.name_or_path", tiny_model_dir,
        f"--data.sources=[{chats}]", "--data.max_length=256", "--trainer.max_steps=4", "--trainer.log_every_n_steps=2",
        "--trainer.val_check_interval=2", "--throughput.warmup_steps=1", f"--trainer.default_root_dir={root}",
        f"--checkpoint.output_dir={root / 'model'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_a_run_prints_its_own_lines_first_and_no_library_notes(quickstart_run):
    _, result = quickstart_run
    output = result.stdout + result.stderr
    assert [note for note in LIBRARY_NOTES if note in output] == [], output
    lines = result.stderr.splitlines()
    first_own = next(index for index, line in enumerate(lines) if line.startswith("data: "))
    # before the data line, only Lightning's one-liners about the seed and the device
    assert all(re.match(r"(Seed set to \d+|GPU available: False, used: False)$", line) for line in lines[:first_own]), lines


def test_without_a_terminal_progress_is_lines_with_the_logged_loss(quickstart_run):
    root, result = quickstart_run
    progress = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert [line.split(" · ")[0] for line in progress] == ["step 2/4", "step 4/4"], result.stderr
    [metrics] = root.rglob("metrics.csv")
    with open(metrics) as file:
        logged = {int(row["step"]) + 1: float(row["train/loss"]) for row in csv.DictReader(file) if row["train/loss"]}
    for line, step in zip(progress, (2, 4)):
        fields = line.split(" · ")
        assert fields[1] == f"train/loss {logged[step]:.4f}"
        assert re.fullmatch(r"[\d,]+ tokens/s", fields[2]), line  # the throughput meter's, from step 1 on
        assert re.fullmatch(r"\d:\d\d:\d\d elapsed, \d:\d\d:\d\d left", fields[3]), line
    assert progress[-1].endswith(", 0:00:00 left")
    assert len([line for line in result.stderr.splitlines() if line.startswith("validation at step ")]) == 2
    assert "█" not in result.stdout + result.stderr and "━" not in result.stdout + result.stderr  # no bar redraws


class _TotalsSeen(StepsBar):
    """The bar's total at each epoch's start, and at the end of the run (a resumed epoch starts without the hook)."""

    def __init__(self):
        super().__init__()
        self.totals = []

    def on_train_epoch_start(self, trainer, module):
        super().on_train_epoch_start(trainer, module)
        self.totals.append(self.total_train_batches)

    def on_train_end(self, trainer, module):
        self.totals.append(self.total_train_batches)
        super().on_train_end(trainer, module)


def boring_fit(root: Path, max_steps: int, callback, ckpt_path=None, **trainer_args) -> L.Trainer:
    """Lightning's BoringModel (64 batches an epoch) fitted to ``max_steps`` with ``callback``."""
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback], logger=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=root, **trainer_args)  # fmt: skip
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return trainer


@pytest.mark.parametrize("accumulate, epochs, expected", [(1, 1, [5, 5]), (2, 1, [10, 10]), (1, 2, [64, 5, 5])])
def test_the_bar_ends_at_max_steps_not_at_the_end_of_the_epoch(tmp_path, accumulate, epochs, expected):
    bar = _TotalsSeen()
    max_steps = 5 + 64 // accumulate * (epochs - 1)
    boring_fit(tmp_path, max_steps, bar, max_epochs=epochs, accumulate_grad_batches=accumulate,
               enable_checkpointing=False)  # fmt: skip
    assert bar.totals == expected


def test_a_resumed_epochs_bar_ends_at_max_steps(tmp_path):
    saved = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10)  # step 10, batch 10 of the epoch's 64
    boring_fit(tmp_path, 10, saved, max_epochs=1)
    [checkpoint] = tmp_path.glob("*.ckpt")
    bar = _TotalsSeen()
    boring_fit(tmp_path / "resumed", 15, bar, ckpt_path=checkpoint, max_epochs=1, enable_checkpointing=False)
    assert bar.totals == [15]  # batches 11 to 15 of 64; Lightning's own bar: 4


def test_a_malformed_json_line_is_one_line_without_the_readers_own_message(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"mess\n')
    result = run_in_own_process("data", "prepare", "--model.name_or_path", tiny_model_dir, f"--data.sources=[{bad}]")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"lt-posttrain: error: data source {str(bad)!r}: {bad}, line 2: malformed JSON (Unterminated string starting "
        "at); fix or remove that line"
    ]
