"""The files a run leaves for others: exported models readable as any file written under the umask, the GGUF
conversion shared by every copy of the same file, the README's quickstart recipe equal to configs/quickstart.yaml."""

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SMOLLM2_GGUF, needs_smollm2
from lt_posttrain.model.export import export_hf
from lt_posttrain.model.loading import file_sha256, gguf_as_hf_folder, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


def modes(folder: Path) -> dict:
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in [folder, *folder.iterdir()]}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_have_the_modes_of_a_plain_write(tmp_path, tiny_model_dir, umask):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    previous = os.umask(umask)
    try:
        output = export_hf(model, tokenizer, tmp_path / "export")
    finally:
        os.umask(previous)
    files = modes(output)
    assert "model.safetensors" in files  # safetensors 0.8 alone would leave it 0600 under any umask
    assert files == {name: 0o666 & ~umask for name in files} | {"export": 0o777 & ~umask}


def test_file_sha256_is_the_content_hash_remembered_per_place(tmp_path, monkeypatch):
    monkeypatch.setenv("LT_POSTTRAIN_CACHE", str(tmp_path / "cache"))
    content = b"weights" * 1000
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(content)
    second.write_bytes(content)
    assert file_sha256(str(first)) == file_sha256(str(second)) == hashlib.sha256(content).hexdigest()
    memos = list((tmp_path / "cache" / "sha256").iterdir())
    assert len(memos) == 2  # one per place of the file
    for memo in memos:
        memo.write_text("remembered")
    assert file_sha256(str(first)) == "remembered"  # the memo is read, not the file
    second.write_bytes(b"other weights")  # a changed file (size, modification time) is read again
    assert file_sha256(str(second)) == hashlib.sha256(b"other weights").hexdigest()


@needs_smollm2
def test_gguf_conversion_is_shared_by_copies_of_the_file(tmp_path):
    """Another virtual environment holds the same package file at another path: it finds the same conversion."""
    original = resolve_model_path(SMOLLM2_GGUF)
    copy = tmp_path / "venv" / Path(original).name
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    folder = Path(gguf_as_hf_folder(original))
    assert gguf_as_hf_folder(str(copy)) == str(folder)
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes(folder).values()) <= {0o666 & ~umask, 0o777 & ~umask}
    assert modes(folder)["model.safetensors"] == 0o666 & ~umask


def test_readme_shows_the_quickstart_recipe_as_it_is():
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("`configs/quickstart.yaml`:\n\n```yaml\n", 1)[1].split("```\n", 1)[0]
    assert shown == (ROOT / "configs" / "quickstart.yaml").read_text()


def test_gguf_conversion_bar_is_off_without_a_terminal(capfd):
    """transformers draws the conversion bar with plain tqdm; under CI or nohup it would fill the log."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from lt_posttrain.model.loading import _conversion_bar_on_terminal_only

    with _conversion_bar_on_terminal_only():
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "Converting" not in capfd.readouterr().err
    list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))  # the library's own again
    assert "Converting" in capfd.readouterr().err
