"""Running recipes in tests: write one, fit it in this process or in one of its own (to kill it, or to cap the size
of the files it writes), and read back what it logged."""

import csv
import os
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lt_posttrain.cli import main

TESTS = Path(__file__).parent


def write_recipe(path: Path, model_dir: Path, chats: Path, **sections) -> Path:
    """A small packed, shuffled fit with accumulation 2 on ``chats``, written to ``path``; ``sections`` update it."""
    recipe = {
        "seed_everything": 0,
        "model": {"name_or_path": str(model_dir), "learning_rate": 1e-3, "warmup": 2},
        "data": {"sources": [str(chats)], "max_length": 320, "batch_size": 1, "packing": True, "shuffle": True},
        "trainer": {"accelerator": "cpu", "accumulate_grad_batches": 2, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0},
        "checkpoint": {"save_end_of_training": False},
    }  # fmt: skip
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    path.write_text(yaml.safe_dump(recipe))
    return path


def fit_args(recipe: Path, root: Path, name: str, *args) -> list[str]:
    """``fit`` of ``recipe`` in ``root`` (checkpoints in ``root/checkpoints``), logging to ``root/name`` as CSV,
    flushed every step (so a killed run's lines are on disk)."""
    return [
        "fit", "--config", str(recipe), "--trainer.default_root_dir", str(root), "--trainer.logger", "CSVLogger",
        "--trainer.logger.save_dir", str(root), "--trainer.logger.name", name,
        "--trainer.logger.flush_logs_every_n_steps", "1", *map(str, args),
    ]  # fmt: skip


def fit_in_own_process(recipe: Path, root: Path, name: str, *args, limit_file_size: int = 0):
    """``lt-posttrain`` :func:`fit_args` in a process of its own that can import the test helpers (``kill_at_step``);
    ``limit_file_size`` caps the size of every file it writes, in bytes, as a full disk would."""

    def cap_file_size():
        if limit_file_size:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    command = [sys.executable, "-m", "lt_posttrain.cli", *fit_args(recipe, root, name, *args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, preexec_fn=cap_file_size)


def failing_here(capsys, *args) -> SimpleNamespace:
    """``lt-posttrain ARGS`` in this process (seconds faster than a new one), expected to fail: its exit status and
    stderr, as ``test_cli.assert_one_line_error`` reads them."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main([str(arg) for arg in args])
    return SimpleNamespace(returncode=exit.value.code, stderr=capsys.readouterr().err)


def logged(root: Path, name: str, column: str = "train/loss") -> dict[int, float]:
    """``{step: value}`` of ``column`` in run ``name``'s ``metrics.csv`` (Lightning logs step k + 1 as step k);
    empty if the run logged nothing."""
    path = root / name / "version_0" / "metrics.csv"
    if not path.exists():
        return {}
    return {int(row["step"]): float(row[column]) for row in csv.DictReader(path.open()) if row.get(column)}


def epochs_of(root: Path, name: str) -> dict[int, int]:
    """``{step: epoch}`` of run ``name``'s training steps."""
    path = root / name / "version_0" / "metrics.csv"
    return {int(row["step"]): int(row["epoch"]) for row in csv.DictReader(path.open()) if row.get("train/loss")}
