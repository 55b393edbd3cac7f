"""A run owns its folder (``trainer.default_root_dir``) while it runs: a second ``fit`` there is one line naming the
first, a killed run's lock is taken over with a note and what it left half-written is removed, a fresh run does not
write its checkpoints among an earlier run's, and a run that fails before training leaves the folder as it was."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_runs import _environment, failing_here, fit_args, write_recipe
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain.cli import main
from lt_posttrain.errors import UserError
from lt_posttrain.training import run_folder
from lt_posttrain.training.run_folder import LOCK_FILE, RunFolder
from test_cli import assert_one_line_error


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", gsm8k_chats(12))


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links as what they point at) with its bytes."""
    return {
        str(path.relative_to(folder)): os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() or path.is_symlink()
    }


def dead_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_two_runs_in_one_folder(tmp_path, tiny_model_dir, chats, capsys, caplog):
    """Run A (a process of its own) waits at step 2; run B (this process) is refused while A runs, resume or not.
    A is killed: B resumes with a note that A's lock is taken over and removes what A left half-written; a fresh run
    is then refused for the checkpoints there, and a run that fails before training changes nothing."""
    root = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, chats, trainer={"max_steps": 3},
                          training_state={"every_n_steps": 1},
                          checkpoint={"save_end_of_training": True, "output_dir": str(root / "hf_model")})  # fmt: skip
    ready, go = tmp_path / "ready", tmp_path / "go"
    wait = ("--trainer.callbacks+=wait_at_step.WaitAtStep", "--trainer.callbacks.step", "2",
            "--trainer.callbacks.ready", ready, "--trainer.callbacks.go", go)  # fmt: skip
    command = [sys.executable, "-m", "lt_posttrain.cli", *fit_args(recipe, root, "a", *wait)]
    output = open(tmp_path / "a.log", "w")
    first = subprocess.Popen(command, env=_environment(), stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert first.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        lock = json.loads((root / LOCK_FILE).read_text())
        assert lock["pid"] == first.pid and lock["host"] == socket.gethostname() and "fit --config" in lock["command"]
        for resume in ((), ("--ckpt_path", "last")):
            result = failing_here(capsys, *fit_args(recipe, root, "b", *resume))
            assert_one_line_error(result, f"{root}' is in use by another run: process {first.pid} on",
                                  str(recipe), "wait for it to end or choose another trainer.default_root_dir")
        assert json.loads((root / LOCK_FILE).read_text()) == lock  # the refused runs left A's lock as it was
    finally:
        first.kill()
        first.wait()
        output.close()
    assert (root / LOCK_FILE).exists()  # killed: no clean-up ran
    checkpoints = root / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt", "step-1.ckpt"]
    # what a run killed while writing leaves: a checkpoint file, a last.ckpt link and an export, half-written
    (checkpoints / f".step-2.ckpt.{first.pid}.partial").write_bytes(b"half")
    os.symlink("step-1.ckpt", checkpoints / f".last.ckpt.{first.pid}.partial")
    (root / ".hf_model.partial-x1y2").mkdir()
    (root / ".hf_model.partial-x1y2" / "model.safetensors").write_bytes(b"half")
    live_partial = checkpoints / f".step-9.ckpt.{os.getppid()}.partial"  # a live process's: not touched
    live_partial.write_bytes(b"writing")

    with caplog.at_level("INFO"):
        capsys.readouterr()
        main(fit_args(recipe, root, "b", "--ckpt_path", "last"))
    notes = caplog.text
    assert f"process {first.pid} on {socket.gethostname()}" in notes and "no longer runs (killed?)" in notes
    assert "removed what a stopped run left half-written" in notes
    assert sorted(path.name for path in checkpoints.iterdir()) == [live_partial.name, "last.ckpt", "step-2.ckpt",
                                                                   "step-3.ckpt"]  # fmt: skip
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3
    assert sorted(path.name for path in root.iterdir() if path.name.startswith(".")) == []  # the lock is gone too
    live_partial.unlink()

    before = tree(root)
    result = failing_here(capsys, *fit_args(recipe, root, "c"))
    assert_one_line_error(result, f"{checkpoints} holds the checkpoints of an earlier run (last.ckpt, step-2.ckpt, "
                          "step-3.ckpt): to continue that run add --ckpt_path last; to start a new one choose another "
                          "trainer.default_root_dir")  # fmt: skip
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    result = failing_here(capsys, *fit_args(recipe, root, "b", "--ckpt_path", "last", "--data.sources", f"[{prompts}]"))
    assert_one_line_error(result, "no training sample has an assistant turn")
    assert tree(root) == before  # neither wrote anything: no log folder, config.yaml, lock or checkpoint


def test_a_run_that_fails_before_training_writes_nothing(tmp_path, tiny_model_dir, chats, capsys):
    """The data is refused after the run folder, log folder, checkpoint and export folders were checked (made): all
    of them are removed again. With the folder there before, it is left as it was."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, prompts, trainer={"max_steps": 2},
                          training_state={"every_n_steps": 1}, checkpoint={"save_end_of_training": True})  # fmt: skip
    root = tmp_path / "new" / "run"
    result = failing_here(capsys, *fit_args(recipe, root, "logs"))
    assert_one_line_error(result, "no training sample has an assistant turn")
    assert not (tmp_path / "new").exists()
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("mine\n")
    result = failing_here(capsys, *fit_args(recipe, root, "logs"))
    assert_one_line_error(result, "no training sample has an assistant turn")
    assert tree(root) == {"notes.txt": b"mine\n"} and [path.name for path in root.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- the lock alone


def write_lock(root: Path, **holder) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / LOCK_FILE).write_text(json.dumps(holder) + "\n")


@pytest.mark.parametrize("locks", [True, False], ids=["flock", "no-locks"])
def test_a_stale_lock_is_taken_over_and_a_live_one_respected(tmp_path, monkeypatch, locks):
    """With ``flock`` a lock file held by no process is stale whatever it names; on a file system without locks,
    the process it names decides: gone (this host) is stale, alive or of another host is respected."""
    if not locks:
        monkeypatch.setattr(run_folder, "fcntl", None)
    host = socket.gethostname()
    write_lock(tmp_path, pid=dead_process_id(), host=host, started="2026-01-01 00:00:00", command="lt-posttrain fit")
    folder = RunFolder(tmp_path, "lt-posttrain fit --config mine.yaml")
    assert "no longer runs (killed?); its lock is taken over" in folder.claim()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    if locks:  # held: a second claim, from this very process, is refused
        with pytest.raises(UserError, match=f"in use by another run: process {os.getpid()} on {host}"):
            RunFolder(tmp_path, "lt-posttrain fit").claim()
    folder.release()
    assert not (tmp_path / LOCK_FILE).exists()
    if not locks:
        write_lock(tmp_path, pid=os.getppid(), host=host, command="lt-posttrain fit")
        with pytest.raises(UserError, match=f"process {os.getppid()} on {host} \\(lt-posttrain fit\\); wait") as error:
            RunFolder(tmp_path, "lt-posttrain fit").claim()
        assert "remove" not in str(error.value)
        write_lock(tmp_path, pid=dead_process_id(), host="another-host", command="lt-posttrain fit")
        with pytest.raises(UserError, match=f"if it no longer runs, remove {tmp_path / LOCK_FILE}"):
            RunFolder(tmp_path, "lt-posttrain fit").claim()


def test_the_lock_of_a_killed_process_is_stale(tmp_path):
    """A process that holds the lock and is killed (SIGKILL): its lock file stays, its lock does not."""
    code = ("import time; from lt_posttrain.training.run_folder import RunFolder; "
            f"RunFolder({str(tmp_path)!r}, 'lt-posttrain fit').claim(); print('ok', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ok"
    with pytest.raises(UserError, match=f"process {holder.pid}"):
        RunFolder(tmp_path, "lt-posttrain fit").claim()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    folder = RunFolder(tmp_path, "lt-posttrain fit")
    assert f"process {holder.pid}" in folder.claim()
    folder.release()
