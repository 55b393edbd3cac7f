"""``lt-posttrain`` runs for tests: a recipe written, ``fit`` in this process or in processes of its own (to kill
one, to cap the size of the files it writes, or one torchrun launch per node) that can import the test helpers
(``grad_capture``, ``rank_audit``, ``kill_at_step``) as callbacks, and what the runs logged."""

import csv
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lt_posttrain.cli import main

TESTS = Path(__file__).parent


# -- recipes -------------------------------------------------------------------------------------------------------
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


# -- runs ----------------------------------------------------------------------------------------------------------
def command_here(capsys, *args) -> SimpleNamespace:
    """``lt-posttrain ARGS`` in this process (seconds faster than a new one, which imports torch, Lightning and
    transformers again): its exit status and what the command printed on stdout and stderr (libraries' log lines
    go to the process's own stderr and are not in it)."""
    capsys.readouterr()
    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit:
        code = 0 if exit.code is None else exit.code
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def failing_here(capsys, *args) -> SimpleNamespace:
    """``lt-posttrain ARGS`` in this process (seconds faster than a new one), expected to fail: its exit status and
    stderr, as ``test_cli.assert_one_line_error`` reads them."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main([str(arg) for arg in args])
    return SimpleNamespace(returncode=exit.value.code, stderr=capsys.readouterr().err)


def _environment() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def run_in_own_process(*args, cwd=None, timeout: int = 900, limit_file_size: int = 0) -> subprocess.CompletedProcess:
    """``lt-posttrain ARGS`` in a process of its own that can import the test helpers; ``limit_file_size`` caps the
    size of every file it writes, in bytes, as a full disk would."""

    def cap_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run(
        [sys.executable, "-m", "lt_posttrain.cli", *map(str, args)], cwd=cwd, env=_environment(), capture_output=True,
        text=True, timeout=timeout, preexec_fn=cap_file_size if limit_file_size else None,
    )  # fmt: skip


def fit_in_own_process(recipe: Path, root: Path, name: str, *args, limit_file_size: int = 0):
    """:func:`fit_args` run by :func:`run_in_own_process`."""
    return run_in_own_process(*fit_args(recipe, root, name, *args), limit_file_size=limit_file_size)


def fit(cwd: Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``lt-posttrain fit ARGS`` in ``cwd``, in a process of its own; fails the test with the end of its output if
    it fails."""
    result = run_in_own_process("fit", *args, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def fit_on_nodes(cwd: Path, nodes: int, *args, timeout: int = 600) -> None:
    """Run ``lt-posttrain fit ARGS`` as ``nodes`` nodes of one process each, all on this machine: one
    ``torchrun --nnodes NODES --node_rank N`` launch per node, as on a cluster (``ARGS`` give
    ``--trainer.num_nodes``)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "lt_posttrain.cli", "fit", *map(str, args)],
            cwd=cwd, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for node in range(nodes)
    ]
    outputs = [launch.communicate(timeout=timeout)[0] for launch in launches]
    for node, (launch, output) in enumerate(zip(launches, outputs)):
        assert launch.returncode == 0, f"node {node}: {output[-3000:]}"


# -- what they logged ----------------------------------------------------------------------------------------------
def _rows_with(metrics: Path, column: str) -> list[dict]:
    """The rows of the CSV log ``metrics`` that hold ``column``."""
    with open(metrics) as file:
        return [row for row in csv.DictReader(file) if row.get(column)]


def logged(root: Path, name: str, column: str = "train/loss") -> dict[int, float]:
    """``{step: value}`` of ``column`` in run ``name``'s ``metrics.csv`` (Lightning logs step k + 1 as step k);
    empty if the run logged nothing."""
    path = root / name / "version_0" / "metrics.csv"
    if not path.exists():
        return {}
    return {int(row["step"]): float(row[column]) for row in _rows_with(path, column)}


def epochs_of(root: Path, name: str) -> dict[int, int]:
    """``{step: epoch}`` of run ``name``'s training steps."""
    path = root / name / "version_0" / "metrics.csv"
    return {int(row["step"]): int(row["epoch"]) for row in _rows_with(path, "train/loss")}


def logged_losses(log_root: Path) -> list[float]:
    """``train/loss`` of each optimizer step, from the one CSV log under ``log_root``."""
    [metrics] = Path(log_root).rglob("metrics.csv")
    return [float(row["train/loss"]) for row in _rows_with(metrics, "train/loss")]
