"""The bad-input harness: malformed recipes, rows, model folders and checkpoint files, generated rather than listed,
each given to ``lt-posttrain fit`` in this process. For every case: exit status 2, exactly one line on stderr
(``lt-posttrain: error: ...``) naming the key, file or row, no traceback, nothing written to the run folder, and
nothing that was there before (a model folder, a checkpoint, an earlier export) changed.

The cases are generated with fixed seeds (hypothesis is not among the test dependencies): 261 when written (the
recipe cases grow with the signatures):

- recipes (171): every numeric key of the model, data, trainer, ``checkpoint``, ``training_state`` and
  ``throughput`` signatures, of a data source and of ``model.lora``, found by introspection and each given the values
  just outside its range (negative, zero, above its maximum, not finite; 83); every key of a plain type (a number, a
  flag, a choice) a value of the wrong type (59); misspelled names, on the command line and in a file (29);
- rows (44): malformed JSON lines, rows that are not objects, ``messages`` and turns and contents of the wrong type,
  unknown roles, empty turns, bad weights;
- model folders (20): ``config.json`` missing, malformed or not matching the weights, safetensors files of random
  bytes, truncated, emptied or missing, tokenizer files malformed or missing;
- checkpoint files (25): random bytes, truncated, empty, zip archives that are not checkpoints, objects that are not
  dicts, dicts missing each key a resume reads, weights of other names or shapes, a pickled class;
- a disk that fills while the export is written (1).

``test_every_numeric_key_has_a_range`` keeps the recipe cases complete: a new numeric key without a range fails it.
"""

import inspect
import json
import os
import random
import resource
import shutil
import typing
import zipfile
from fractions import Fraction
from pathlib import Path

import lightning as L
import pytest
import torch

from cli_runs import failing_here
from conftest import gsm8k_chats, write_jsonl
from lt_posttrain import InstructDataModule, SFTModule, Source
from lt_posttrain.callbacks.hf_export import HFCheckpoint
from lt_posttrain.callbacks.throughput import ThroughputMeter
from lt_posttrain.callbacks.training_state import TrainingStateCheckpoint
from lt_posttrain.callbacks.validation_answers import ValidationAnswers
from lt_posttrain.cli import main
from lt_posttrain.model.lora import LoraOptions
from lt_posttrain.ranges import RANGES, Range

SECTIONS = {
    "model": SFTModule, "data": InstructDataModule, "trainer": L.Trainer, "checkpoint": HFCheckpoint,
    "training_state": TrainingStateCheckpoint, "throughput": ThroughputMeter, "data.sources": Source,
    "model.lora": LoraOptions, "validation_answers": ValidationAnswers,
}  # fmt: skip
"""Each section of a recipe and the class whose signature gives its keys."""


# ---------------------------------------------------------------- what a refusal must look like


def refused(result, *names: str) -> str:
    """Assert the one-line refusal: status 2, one line on stderr, no traceback, each of ``names`` in it."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("lt-posttrain: error: "), result.stderr[-2000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (a link as where it points)."""
    if not folder.exists():
        return {}
    return {str(path.relative_to(folder)): os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file() or path.is_symlink()}  # fmt: skip


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", gsm8k_chats(6))


@pytest.fixture
def fit(capsys, tmp_path, tiny_model_dir, chats):
    """``fit(*args, model=..., sources=..., root=...)``: a one-step fit in this process, expected to be refused; a
    fresh run folder unless ``root`` is given. Asserts the folder holds afterwards what it held before."""

    def run(*args, model=tiny_model_dir, sources=None, root=None):
        root = root or tmp_path / "run"
        before = tree(root)
        existed = root.exists()
        result = failing_here(capsys, "fit", "--model.name_or_path", model, "--data.sources", sources or f"[{chats}]",
                              "--trainer.default_root_dir", root, "--trainer.accelerator", "cpu", "--trainer.max_steps",
                              "1", "--trainer.enable_progress_bar", "false", *args)  # fmt: skip
        assert root.exists() == existed and tree(root) == before, "the refused run wrote to its folder"
        return result

    return run


# ---------------------------------------------------------------- recipes


def numeric_kinds(annotation) -> set[type]:
    """``int`` and/or ``float`` where ``annotation`` (or a member of its Union) is one; containers, literals and
    ``bool`` are not numbers."""
    if annotation in (int, float):
        return {annotation}
    if typing.get_origin(annotation) is typing.Union:
        return set().union(*(numeric_kinds(member) for member in typing.get_args(annotation)))
    return set()


def numeric_keys() -> dict[str, set[type]]:
    """``{"section.key": {int, float}}`` for every numeric argument of the sections' signatures."""
    keys = {"seed_everything": {int}}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls if isinstance(cls, type) and hasattr(cls, "__dataclass_fields__")
                                      else cls.__init__)  # fmt: skip
        for name in inspect.signature(cls).parameters:
            kinds = numeric_kinds(hints.get(name))
            if kinds:
                keys[f"{section}.{name}"] = kinds
    return keys


NUMERIC = numeric_keys()


def out_of_range(allowed: Range, kinds: set[type]) -> list:
    """Values just outside ``allowed``: below its minimum (negative, zero), above its maximum, not finite."""
    floats = float in kinds
    low = allowed.minimum
    values = [low] if allowed.above and not allowed.fraction else []
    values += [low - 0.001 if floats and not allowed.fraction else low - 1]
    if allowed.also:
        values.append(min(allowed.also) - 1)
    if allowed.fraction:
        values += [-0.5, 1.5]
    elif allowed.maximum is not None:
        values.append(allowed.maximum if allowed.below else allowed.maximum + 1)
    if floats:
        values.append(float("nan"))
    return [value for value in dict.fromkeys(values) if not allowed.accepts(value) or value != value]


def recipe_value(key: str, value, chats: Path) -> list[str]:
    """The command-line arguments that give ``key`` the value ``value`` (negative numbers as separate arguments,
    floats in exponent form, as a user types them: argparse alone reads ``--key -1e-3`` as a key without value)."""
    section, _, name = key.rpartition(".")
    text = "nan" if value != value else f"{value:e}" if isinstance(value, float) else repr(value)  # -1.000000e-03
    if section == "data.sources":
        return ["--data.sources", f"[{{name_or_path: {chats}, {name}: {text}}}]"]
    if section == "model.lora":
        return ["--model.lora", f"{{{name}: {text}}}"]
    return [f"--{key}", text]


RANGE_CASES = [(key, value) for key, kinds in NUMERIC.items() if key in RANGES
               for value in out_of_range(RANGES[key], kinds)]  # fmt: skip


def test_every_numeric_key_has_a_range():
    assert not NUMERIC.keys() - RANGES.keys(), "numeric keys without a range in lt_posttrain/ranges.py"
    assert not RANGES.keys() - NUMERIC.keys(), "ranges of keys that no signature has"
    for key, allowed in RANGES.items():  # the range's own edges are accepted
        edges = [allowed.minimum + (1 if allowed.above else 0), *allowed.also]
        assert all(allowed.accepts(edge) for edge in edges), key


@pytest.mark.parametrize("key,value", RANGE_CASES, ids=[f"{key}={value}" for key, value in RANGE_CASES])
def test_a_number_out_of_range(fit, chats, key, value):
    line = refused(fit(*recipe_value(key, value, chats)), key)
    assert "must be" in line or "Expected" in line


def simple_keys() -> dict[str, str]:
    """``{"section.key": kind}`` for each key of a plain type (a number, a flag, a choice): the value of the wrong
    type to give it."""
    keys = {}
    for section, cls in SECTIONS.items():
        if "." in section:
            continue
        hints = typing.get_type_hints(cls.__init__)
        for name in inspect.signature(cls).parameters:
            annotation = hints.get(name)
            members = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)
            members = [member for member in members if member is not type(None)]
            literal = all(typing.get_origin(member) is typing.Literal for member in members) and members
            if members and (all(member in (int, float, bool) for member in members) or literal):
                keys[f"{section}.{name}"] = "a-word" if float in members or int in members else "maybe"
    return keys


TYPE_CASES = sorted(simple_keys().items())


@pytest.mark.parametrize("key,value", TYPE_CASES, ids=[key for key, _ in TYPE_CASES])
def test_a_value_of_the_wrong_type(fit, key, value):
    refused(fit(f"--{key}", value), key, value)


def misspelled(name: str, generator: random.Random) -> str:
    """``name`` with one letter dropped, doubled or two neighbours swapped."""
    position = generator.randrange(len(name) - 1)
    kind = generator.choice(["drop", "double", "swap"])
    if kind == "drop":
        return name[:position] + name[position + 1 :]
    if kind == "double":
        return name[:position] + name[position] + name[position:]
    swapped = name[:position] + name[position + 1] + name[position] + name[position + 2 :]
    return swapped if swapped != name else name + "x"


def misspelled_keys(per_section: int = 8, seed: int = 20) -> list[tuple[str, str, bool]]:
    """``(section, misspelled key, in a file)`` for a sample of each section's keys, seeded."""
    generator, cases = random.Random(seed), []
    for section in ("model", "data", "trainer", "checkpoint"):
        names = [name for name in inspect.signature(SECTIONS[section]).parameters if len(name) > 3]
        for number, name in enumerate(generator.sample(names, min(per_section, len(names)))):
            cases.append((section, misspelled(name, generator), number % 2 == 1))
    return cases


SPELLING_CASES = misspelled_keys()


@pytest.mark.parametrize("section,key,in_file", SPELLING_CASES, ids=[f"{s}.{k}" for s, k, _ in SPELLING_CASES])
def test_a_misspelled_key(fit, tmp_path, section, key, in_file):
    if in_file:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"{section}:\n  {key}: 1\n")
        line = refused(fit("--config", recipe), f"unknown key '{section}.{key}'")
    else:
        line = refused(fit(f"--{section}.{key}", "1"), f"'{section}.{key}'")
    assert "lists the valid keys" in line


# ---------------------------------------------------------------- rows


def good_row(number: int) -> dict:
    return gsm8k_chats(1, start=number)[0]


def row_cases(seed: int = 3) -> list[tuple[str, str]]:
    """``(name, a JSON Lines line)`` for each malformed row."""
    generator = random.Random(seed)
    line = json.dumps(good_row(0))
    turn = lambda **fields: json.dumps({"messages": [{"role": "user", "content": "What is 2 + 2?"},  # noqa: E731
                                                     {"role": "assistant", "content": "4", **fields}]})  # fmt: skip
    user = lambda value: json.dumps({"messages": [value, {"role": "assistant", "content": "4"}]})  # noqa: E731
    cases = [(f"json-cut-{cut}", line[:cut]) for cut in sorted(generator.sample(range(1, len(line) - 1), 3))]
    cases += [("json-trailing-comma", line[:-1] + ",}"), ("json-single-quotes", line.replace('"', "'"))]
    cases += [(f"row-{kind}", text) for kind, text in [("list", "[1, 2]"), ("number", "5"), ("text", '"hi"'),
                                                       ("true", "true")]]  # fmt: skip
    cases += [(f"messages-{kind}", json.dumps({"messages": value}))
              for kind, value in [("int", 7), ("float", 0.5), ("object", {"role": "user"}), ("true", True),
                                  ("text", "not json")]]  # fmt: skip
    cases += [(f"turn-{kind}", user(value)) for kind, value in [("null", None), ("int", 3), ("text", "hi"),
                                                                ("list", ["user", "hi"])]]  # fmt: skip
    cases += [("turn-no-role", user({"content": "hi"})), ("turn-no-content", user({"role": "user"})),
              ("turn-empty", user({})), ("assistant-no-content", turn(content=None))]  # fmt: skip
    cases += [(f"role-{kind}", user({"role": value, "content": "hi"}))
              for kind, value in [("int", 1), ("null", None), ("list", ["user"])]]  # fmt: skip
    words = ["narrator", "human", "gpt", "bot", "Assistant", "USER", "model", "".join(generator.sample("abcdefgh", 5))]
    cases += [(f"role-{word}", user({"role": word, "content": "hi"})) for word in words]
    cases += [(f"content-{kind}", user({"role": "user", "content": value}))
              for kind, value in [("int", 5), ("float", 2.5), ("object", {"text": "hi"}), ("ints", [1, 2]),
                                  ("texts", ["hi"]), ("true", True),
                                  ("parts-without-type", [{"text": "hi"}])]]  # fmt: skip
    cases += [(f"weight-{kind}", json.dumps({**good_row(1), "weight": value}))
              for kind, value in [("text", "heavy"), ("negative", -1), ("true", True), ("list", [1])]]  # fmt: skip
    return cases


ROW_CASES = row_cases()


@pytest.mark.parametrize("name,line", ROW_CASES, ids=[name for name, _ in ROW_CASES])
def test_a_malformed_row(fit, tmp_path, name, line):
    """The bad row third among good ones (a weight case: every other row has its weight)."""
    rows = [json.dumps(good_row(n) | ({"weight": 1.0} if name.startswith("weight") else {})) for n in range(2, 6)]
    data = tmp_path / f"{name}.jsonl"
    data.write_text("\n".join(rows[:2] + [line] + rows[2:]) + "\n")
    error = refused(fit(sources=f"[{data}]"), data.name)
    assert "row 2" in error or "line 3" in error, error


# ---------------------------------------------------------------- model folders


MODEL_CASES = [
    "config-missing", "config-list", "config-hidden-size-text", "config-layers-negative", "config-layers-fewer",
    "config-hidden-size-other", "config-cut:0", "config-cut:1", "weights-random:7", "weights-random:4096",
    "weights-cut:0.0001", "weights-cut:0.5", "weights-cut:0.999", "weights-empty", "weights-missing", "weights-header",
    "tokenizer-not-json", "tokenizer-config-not-json", "tokenizer-missing", "tokenizer-both-missing",
]


def break_model(name: str, folder: Path, seed: int = 5) -> None:
    """Break the model folder ``folder`` (the tiny model's files, linked) as case ``name`` says: the changed file is
    removed and written anew, never written through its link."""
    generator = random.Random(f"{seed}-{name}")
    kind, _, detail = name.partition(":")
    config = json.loads((folder / "config.json").read_text())
    weights = (folder / "model.safetensors").read_bytes()
    file = {"config": "config.json", "weights": "model.safetensors", "tokenizer": "tokenizer.json"}[kind.split("-")[0]]
    content = {
        "config-list": "[1, 2]",
        "config-hidden-size-text": json.dumps({**config, "hidden_size": "big"}),
        "config-layers-negative": json.dumps({**config, "num_hidden_layers": -1}),
        "config-layers-fewer": json.dumps({**config, "num_hidden_layers": 1}),
        "config-hidden-size-other": json.dumps({**config, "hidden_size": 32}),
        "weights-empty": b"",
        "weights-header": weights[:8] + b"\xff" * 8 + weights[16:],  # the header's JSON overwritten
        "tokenizer-not-json": "{broken",
    }.get(kind)
    if kind == "config-cut":
        text = json.dumps(config)
        content = text[: generator.sample(range(1, len(text)), 2)[int(detail)]]
    elif kind == "weights-random":
        content = generator.randbytes(int(detail))
    elif kind == "weights-cut":
        content = weights[: int(len(weights) * float(detail))]
    elif kind == "tokenizer-config-not-json":
        file, content = "tokenizer_config.json", '{"a": '
    (folder / file).unlink()
    if kind == "tokenizer-both-missing":
        (folder / "tokenizer_config.json").unlink()
    if content is not None:
        (folder / file).write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("name", MODEL_CASES)
def test_a_broken_model_folder(fit, tmp_path, tiny_model_dir, name):
    """A copy of the tiny model with one file broken (or gone); the original is left as it was."""
    original = tree(tiny_model_dir)
    folder = tmp_path / "model"
    folder.mkdir()
    for path in tiny_model_dir.iterdir():
        os.link(path, folder / path.name)
    break_model(name, folder)
    refused(fit(model=folder), f"model.name_or_path '{folder}'")
    assert tree(tiny_model_dir) == original


# ---------------------------------------------------------------- checkpoint files


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, chats) -> tuple[Path, dict]:
    """A one-step run with its checkpoint: ``(run folder, the checkpoint as loaded)``."""
    root = tmp_path_factory.mktemp("trained")
    main(["fit", "--model.name_or_path", tiny_model_dir, "--data.sources", f"[{chats}]", "--trainer.default_root_dir",
          root, "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
          "--training_state.every_n_steps", "1", "--checkpoint.save_end_of_training", "false"])  # fmt: skip
    return root, torch.load(root / "checkpoints" / "step-1.ckpt", weights_only=True)


def write_checkpoint_case(name: str, path: Path, real: Path, state: dict, seed: int = 11) -> None:
    """Write the broken checkpoint ``name`` (one of :data:`CHECKPOINT_CASES`) at ``path``."""
    generator = random.Random(f"{seed}-{name}")
    data = real.read_bytes()
    kind, _, detail = name.partition(":")
    if kind == "random":
        path.write_bytes(generator.randbytes(int(detail)))
    elif kind == "cut":
        path.write_bytes(data[: int(len(data) * float(detail))])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/notes.txt", "not a checkpoint")
    elif kind == "object":
        torch.save({"list": [1, 2], "tensor": torch.zeros(3), "text": "step-1"}[detail], path)
    elif kind == "without":
        torch.save({key: value for key, value in state.items() if key != detail}, path)
    elif kind == "loops":
        torch.save({**state, "loops": {}}, path)
    elif kind == "global_step":
        torch.save({**state, "global_step": "one"}, path)
    elif kind == "weights":
        weights = state["state_dict"]
        other = ({f"other.{key}": value for key, value in weights.items()} if detail == "names" else
                 {key: value[..., :1] if value.ndim else value for key, value in weights.items()})  # fmt: skip
        torch.save({**state, "state_dict": other}, path)
    elif kind == "pickled":
        torch.save({**state, "note": Fraction(1, 3)}, path)
    else:
        raise ValueError(name)


CHECKPOINT_CASES = [
    "random:1", "random:100", "random:5000", "cut:0.001", "cut:0.3", "cut:0.9", "cut:0.9999", "empty", "zip",
    "object:list", "object:tensor", "object:text", "without:pytorch-lightning_version", "without:global_step",
    "without:loops", "without:state_dict", "without:optimizer_states", "without:lr_schedulers", "loops",
    "global_step", "weights:names", "weights:shapes", "pickled",
]
CHECKPOINT_MESSAGES = {"object": "not a training checkpoint", "without:pytorch-lightning_version":
                       "not a training checkpoint", "weights": "weights do not fit this model",
                       "pickled": "if you trust the file, add --weights_only false"}  # fmt: skip


@pytest.mark.parametrize("name", CHECKPOINT_CASES + ["missing", "folder"])
def test_a_broken_checkpoint(fit, trained, tmp_path, name):
    """Resumed in the run folder of the checkpoint it was made from: the folder and that checkpoint unchanged."""
    root, state = trained
    path = tmp_path / "broken.ckpt"
    if name == "folder":
        path.mkdir()
    elif name != "missing":
        write_checkpoint_case(name, path, root / "checkpoints" / "step-1.ckpt", state)
    kind = name.partition(":")[0]
    message = CHECKPOINT_MESSAGES.get(name, CHECKPOINT_MESSAGES.get(kind, ""))
    line = refused(fit("--ckpt_path", path, root=root), str(path), message)
    if not message:
        assert any(text in line for text in ("cannot be read", "not a complete", "no such", "not a complete checkpoint",
                                             "a folder, but not")), line  # fmt: skip
    if kind != "pickled":
        assert "--weights_only false" not in line  # never the advice to load bytes that are no checkpoint unsafely


# ---------------------------------------------------------------- a disk that fills during the export


def test_a_disk_that_fills_during_the_export_keeps_the_earlier_one(capsys, tmp_path, tiny_model_dir, chats):
    """Files capped at 1 MB (as a full disk): the export at the end fails in one line and the earlier export in
    that folder is as it was, with nothing half-written beside it."""
    export = tmp_path / "hf_model"
    args = ["fit", "--model.name_or_path", tiny_model_dir, "--data.sources", f"[{chats}]", "--trainer.accelerator",
            "cpu", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_checkpointing", "false", "--checkpoint.output_dir", export]  # fmt: skip
    main([*args, "--trainer.default_root_dir", tmp_path / "first"])
    before = tree(export)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        result = failing_here(capsys, *args, "--trainer.default_root_dir", tmp_path / "second")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    refused(result, f"checkpoint.output_dir '{export}': cannot write the export (File too large)", "held before")
    assert tree(export) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first", "hf_model", "second"]
