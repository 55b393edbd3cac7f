"""The public surface: plugins import ``lt_posttrain`` (and, in their tests, ``lt_posttrain.testing``) and nothing
deeper; ``import lt_posttrain`` leaves the command line out; nothing below the CLI imports it; the batch layout is
asked of ``lt_posttrain.batch`` only."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lt_posttrain
import lt_posttrain.testing

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lt_posttrain"
SKIPPED = {"build", "__pycache__"}  # build folders hold copies that pip made of the plugins


def python_files(folder: Path) -> list[Path]:
    return [path for path in sorted(folder.rglob("*.py"))
            if not SKIPPED & set(path.relative_to(folder).parts) and ".egg-info" not in str(path)]  # fmt: skip


def ours(module: str) -> bool:
    return module == "lt_posttrain" or module.startswith("lt_posttrain.")


def imported_names(source: str) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` for every name of ours that ``source`` imports or reads as ``lt_posttrain.NAME``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and ours(node.module) and node.level == 0:
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, "") for alias in node.names if ours(alias.name)]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lt_posttrain":
            found.append((node.lineno, "lt_posttrain", node.attr))
    return found


def off_surface(source: str, in_tests: bool) -> list[str]:
    """What ``source`` uses of lt_posttrain beyond the surface: ``lt_posttrain``'s ``__all__``, and in a plugin's
    tests also ``lt_posttrain.testing``'s."""
    problems = []
    for line, module, name in imported_names(source):
        if module == "lt_posttrain" and (not name or name in lt_posttrain.__all__):
            continue
        if module == "lt_posttrain.testing" and in_tests and name in lt_posttrain.testing.__all__:
            continue
        problems.append(f"line {line}: {module}{'.' + name if name else ''}")
    return problems


def test_the_check_finds_what_is_off_the_surface():
    source = ("from lt_posttrain import SFTModule\nfrom lt_posttrain.data.collate import collate_packed\n"
              "import lt_posttrain.training.sharding\nfrom lt_posttrain.testing import save_tiny_llama\n"
              "import lt_posttrain\nlt_posttrain.UserError, lt_posttrain.cli\nfrom lt_posttrain_dpo import loss\n")  # fmt: skip
    assert off_surface(source, in_tests=False) == [
        "line 2: lt_posttrain.data.collate.collate_packed", "line 3: lt_posttrain.training.sharding",
        "line 4: lt_posttrain.testing.save_tiny_llama", "line 6: lt_posttrain.cli",
    ]  # fmt: skip
    assert off_surface(source, in_tests=True) == [
        "line 2: lt_posttrain.data.collate.collate_packed", "line 3: lt_posttrain.training.sharding",
        "line 6: lt_posttrain.cli",
    ]  # fmt: skip


@pytest.mark.parametrize("path", python_files(ROOT / "plugins"), ids=lambda path: str(path.relative_to(ROOT)))
def test_plugins_import_only_the_public_surface(path):
    in_tests = "tests" in path.relative_to(ROOT / "plugins").parts
    assert off_surface(path.read_text(), in_tests) == [], f"{path.relative_to(ROOT)} reaches past lt_posttrain's surface"


def test_every_public_name_exists_and_the_surface_has_a_version():
    for module in (lt_posttrain, lt_posttrain.testing):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert not missing and len(set(module.__all__)) == len(module.__all__)
    major, minor = map(int, lt_posttrain.__api_version__.split("."))
    assert major >= 1 and minor >= 0


def test_a_micro_batch_made_as_in_1_2_still_works_and_knows_its_step_since_1_3():
    """``MicroBatch(packs, loss_count, step_loss_count)`` (as DPO's precompute makes one) keeps working; since 1.3 it
    also says which optimizer step it belongs to (``step_packs``, ``step_micro_batches``, ``first_of_step``)."""
    made = lt_posttrain.MicroBatch(((0, 1), (2,)), 3, 3)
    assert made.step_packs == () and made.step_micro_batches == () and made.first_of_step
    planned = lt_posttrain.MicroBatch(((2,),), 1, 3, ((0, 1), (2,)), (((0, 1),), ((2,),)))
    assert not planned.first_of_step
    assert tuple(map(int, lt_posttrain.__api_version__.split("."))) >= (1, 3)


def test_load_model_builds_other_heads_as_the_trained_model_is_loaded(tiny_model_dir):
    """``load_model`` (since 1.4): a reward model's head on the tiny Llama, in train mode, with our attention; a bad
    path is the user's one-line error."""
    from transformers import AutoModelForSequenceClassification

    model = lt_posttrain.load_model(str(tiny_model_dir), AutoModelForSequenceClassification, num_labels=1)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.training
    assert model.score.out_features == 1 and model.config._attn_implementation == "varlen"
    assert type(lt_posttrain.load_model(str(tiny_model_dir))).__name__ == "LlamaForCausalLM"
    with pytest.raises(lt_posttrain.UserError, match="model.name_or_path"):
        lt_posttrain.load_model(str(tiny_model_dir / "missing"))
    assert tuple(map(int, lt_posttrain.__api_version__.split("."))) >= (1, 4)


def test_importing_the_package_leaves_the_command_line_out():
    probe = "import sys, lt_posttrain; print(sorted(m for m in sys.modules if m.startswith('lt_posttrain.cli')))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]"


def test_nothing_below_the_command_line_imports_it():
    """``api.run`` imports it inside the function, when a recipe runs; no other module outside ``cli/`` does."""
    for path in python_files(PACKAGE):
        if path.parent.name == "cli":
            continue
        tree = ast.parse(path.read_text())
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        nodes = top_level if path.name == "api.py" else list(ast.walk(tree))
        for node in nodes:
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            modules += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            assert not any(m == "lt_posttrain.cli" or m.startswith("lt_posttrain.cli.") for m in modules), path


LAYOUT_KEYS = {"cu_seq_lens_q", "cu_seq_lens_k", "attention_mask", "position_ids"}


def layout_guesses(source: str) -> list[int]:
    """Lines that test whether a batch holds one of the layout keys (``"cu_seq_lens_q" in batch``)."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and node.left.value in LAYOUT_KEYS
            and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)]  # fmt: skip


def test_only_the_batch_contract_tells_packed_from_padded():
    assert layout_guesses('if "cu_seq_lens_q" not in batch:\n    pass\n') == [1]
    guesses = {str(path.relative_to(ROOT)): layout_guesses(path.read_text())
               for path in python_files(PACKAGE) + python_files(ROOT / "plugins") if path.name != "batch.py"}  # fmt: skip
    assert {path: lines for path, lines in guesses.items() if lines} == {}


def test_ignore_index_is_defined_once():
    definitions = []
    for path in python_files(PACKAGE) + python_files(ROOT / "plugins"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IGNORE_INDEX" for t in node.targets):
                definitions.append(str(path.relative_to(ROOT)))
    assert definitions == ["src/lt_posttrain/batch.py"]
