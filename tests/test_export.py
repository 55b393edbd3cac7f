"""The Hugging Face export is all or nothing, for a model split into several files too: a process killed at any
point of the switch leaves a folder that loads as the earlier export or the new one, never a mix; what a killed
export left is put right by the next one; a write that fails is one line, the earlier export untouched."""

import os
import resource
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lt_posttrain.errors import UserError
from lt_posttrain.model import export
from lt_posttrain.model.export import export_hf, recover_folder

SHARD = "300KB"  # the tiny model in several files


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """Two models of one architecture with different weights: the earlier export and the new one."""
    old = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    new = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for parameter in new.parameters():
            parameter.add_(1.0)
    return old, new


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def same(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


def earlier_export(folder: Path, model, tokenizer) -> None:
    """``model`` exported to ``folder``, with two step exports inside (as ``save_every_n_steps`` writes them)."""
    export_hf(model, tokenizer, folder, max_shard_size=SHARD)
    for step in (2, 4):
        export_hf(model, tokenizer, folder / f"step-{step}", max_shard_size=SHARD)


def count_switch_calls(monkeypatch) -> list:
    """Record every rename and exchange the export makes."""
    calls = []
    rename, exchange = os.rename, export._exchange
    monkeypatch.setattr(os, "rename", lambda *args: (calls.append(("rename", args)), rename(*args))[1])
    monkeypatch.setattr(export, "_exchange", lambda *args: (calls.append(("exchange", args)), exchange(*args))[1])
    return calls


def killed_at(call: int, work) -> None:
    """Run ``work`` in a forked process that is killed (``os._exit``, no clean-up runs) as it reaches its ``call``-th
    rename or exchange, before doing it."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            seen = [0]
            rename, exchange = os.rename, export._exchange

            def counted(original):
                def call_it(*args):
                    seen[0] += 1
                    if seen[0] == call:
                        os._exit(9)
                    return original(*args)

                return call_it

            os.rename, export._exchange = counted(rename), counted(exchange)
            work()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9, "the export finished before the point it was to be killed at"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchanged", "renamed-twice"])
def test_a_sharded_export_killed_at_any_point_of_its_switch_is_the_old_or_the_new(
    tmp_path, models, tokenizer, monkeypatch, exchange
):
    """Killed before each rename (or exchange) of the switch in turn: the folder loads as the old export or the new
    one. Where the switch is two renames (a file system without an atomic exchange), a kill between them leaves no
    folder, which the next export (or run) puts back before anything else. The step exports survive every kill."""
    old, new = models
    old_weights, new_weights = old.state_dict(), new.state_dict()
    if not exchange:
        monkeypatch.setattr(export, "_exchange", lambda first, second: False)
    reference = tmp_path / "reference" / "hf_model"
    earlier_export(reference, old, tokenizer)
    assert len(list(reference.glob("*.safetensors"))) >= 2  # several files and an index, switched in as one
    calls = count_switch_calls(monkeypatch)
    export_hf(new, tokenizer, reference, max_shard_size=SHARD)
    monkeypatch.undo()
    if not exchange:
        monkeypatch.setattr(export, "_exchange", lambda first, second: False)
    assert [kind for kind, _ in calls].count("exchange" if exchange else "rename") >= 1 and len(calls) >= 4
    seen = set()
    for call in range(1, len(calls) + 1):
        folder = tmp_path / f"killed-at-{call}" / "hf_model"
        earlier_export(folder, old, tokenizer)
        killed_at(call, lambda: export_hf(new, tokenizer, folder, max_shard_size=SHARD))
        if folder.exists():
            loaded = weights(folder)
            assert same(loaded, old_weights) or same(loaded, new_weights), call
            seen.add("new" if same(loaded, new_weights) else "old")
        else:
            assert not exchange, call  # only between the two renames
            seen.add("none")
        recover_folder(folder)
        loaded = weights(folder)
        assert same(loaded, old_weights) or same(loaded, new_weights), call
        assert sorted(path.name for path in folder.iterdir() if path.is_dir()) == ["step-2", "step-4"], call
        assert same(weights(folder / "step-4"), old_weights)
        assert leftovers(folder.parent) == [], call
    assert {"old", "new"} <= seen and ("none" in seen) != exchange


def test_what_a_killed_export_left_is_put_right_by_the_next(tmp_path, models, tokenizer):
    old, new = models
    folder = tmp_path / "hf_model"
    earlier_export(folder, old, tokenizer)
    killed_at(1, lambda: export_hf(new, tokenizer, folder, max_shard_size=SHARD))  # the staged folder left behind
    assert [name.rpartition("-")[0] for name in leftovers(tmp_path)] == [".hf_model.partial"]
    export_hf(new, tokenizer, folder, max_shard_size=SHARD)
    assert same(weights(folder), new.state_dict()) and same(weights(folder / "step-2"), old.state_dict())
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("limit", [64 * 2**10, 4 * 2**20])
def test_a_full_disk_during_the_export_is_one_line_and_keeps_the_earlier_export(tmp_path, models, tokenizer, limit):
    """Files capped at ``limit`` bytes, as a full disk would cut them: in the weights (the first shard is larger) or
    in a later file. The error names the folder and the reason; the earlier export is as it was."""
    old, new = models
    folder = tmp_path / "hf_model"
    export_hf(old, tokenizer, folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            try:
                export_hf(new, tokenizer, folder)
                message = "no error"
            except UserError as error:
                message = str(error)
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    assert message.startswith(f"checkpoint.output_dir {str(folder)!r}: cannot write the export (File too large)")
    assert "\n" not in message
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_an_export_folder_that_is_a_file_is_one_line(tmp_path, models, tokenizer):
    folder = tmp_path / "hf_model"
    folder.write_text("not a folder\n")
    with pytest.raises(UserError, match="hf_model.: exists and is not a folder"):
        export_hf(models[0], tokenizer, folder)
    assert folder.read_text() == "not a folder\n" and leftovers(tmp_path) == []
