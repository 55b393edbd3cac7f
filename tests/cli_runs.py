"""``lt-posttrain fit`` in subprocesses for tests (one launch, or one torchrun launch per node), with the test helpers
(``grad_capture``, ``rank_audit``) importable as callbacks, and the per-step losses it logged."""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def _environment() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def fit(cwd: Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``lt-posttrain fit ARGS`` in ``cwd``; fails the test with the end of its output if it fails."""
    command = [sys.executable, "-m", "lt_posttrain.cli", "fit", *map(str, args)]
    result = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=timeout)
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


def logged_losses(log_root: Path) -> list[float]:
    """``train/loss`` of each optimizer step, from the one CSV log under ``log_root``."""
    [metrics] = Path(log_root).rglob("metrics.csv")
    with open(metrics) as file:
        return [float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]
