"""``package://PKG/FILE`` finds a file inside an installed package's own folder, without importing (so without
running) anything, and refuses every path that would leave that folder, in one line."""

import sys
from pathlib import Path

import pytest

from cli_runs import failing_here
from lt_posttrain.errors import UserError
from lt_posttrain.model.loading import resolve_model_path
from test_cli import assert_one_line_error


@pytest.fixture
def package(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """An installed package ``shipped_files`` (on ``sys.path``) whose code, if it ever runs, leaves a marker file:
    ``(its folder, the marker)``. It holds ``model.txt``, a sub-package ``sub`` with ``weights.bin``, a link out of
    the package and a file beside the package."""
    root = tmp_path / "site"
    folder = root / "shipped_files"
    (folder / "sub").mkdir(parents=True)
    marker = tmp_path / "code-ran"
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text(__name__)\n"
    (folder / "__init__.py").write_text(code)
    (folder / "sub" / "__init__.py").write_text(code)
    (folder / "model.txt").write_text("inside\n")
    (folder / "sub" / "weights.bin").write_bytes(b"\0")
    (root / "secret.txt").write_text("outside\n")
    (folder / "escape").symlink_to(root)
    (root / "single_module.py").write_text(code)
    monkeypatch.syspath_prepend(str(root))
    for name in ("shipped_files", "shipped_files.sub", "single_module"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return folder, marker


def test_a_file_of_a_package_and_of_its_sub_package_is_found_without_running_its_code(package):
    folder, marker = package
    assert resolve_model_path("package://shipped_files/model.txt") == str((folder / "model.txt").resolve())
    assert resolve_model_path("package://shipped_files.sub/weights.bin") == str((folder / "sub/weights.bin").resolve())
    assert resolve_model_path("package://shipped_files/sub/weights.bin") == str((folder / "sub/weights.bin").resolve())
    assert not marker.exists()
    assert "shipped_files" not in sys.modules and "shipped_files.sub" not in sys.modules


@pytest.mark.parametrize(
    "url,message",
    [
        ("package://shipped_files/../secret.txt", "without '..'"),
        ("package://shipped_files/sub/../../secret.txt", "without '..'"),
        ("package:///etc/passwd", "is not a package name"),
        ("package://shipped_files//etc/passwd", "without '..', '.', empty or absolute parts"),
        ("package://shipped_files/escape/secret.txt", "leads outside the package's folder"),
        ("package://shipped_files\\..\\secret.txt", "is not a package name"),
        ("package://shipped_files/sub\\..\\..\\secret.txt", "relative path inside the package"),
        ("package://shipped_files/./model.txt", "'.'"),
        ("package://shipped_files/", "relative path inside the package"),
        ("package://shipped_files", "relative path inside the package"),
        ("package://shipped_files.sub..x/model.txt", "is not a package name"),
        ("package://os.path/model.txt", "is a module, not a package folder"),
        ("package://single_module/model.txt", "is a module, not a package folder"),
        ("package://no_such_package_here/model.txt", "not installed (pip install it)"),
        ("package://shipped_files/missing.txt", "no 'missing.txt' in package 'shipped_files'"),
    ],
)
def test_paths_that_leave_the_package_or_name_nothing_are_refused(package, url, message):
    folder, marker = package
    with pytest.raises(UserError, match="model.name_or_path") as error:
        resolve_model_path(url)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert "outside" not in str(error.value).replace("outside the package", "")  # the file was not read
    assert not marker.exists()


def test_through_the_command_line_one_line_and_nothing_runs(package, capsys, tmp_path):
    _, marker = package
    result = failing_here(capsys, "fit", "--model.name_or_path", "package://shipped_files.sub/../../../secret.txt",
                          "--data.sources", "[x.jsonl]", "--trainer.default_root_dir", tmp_path / "run")  # fmt: skip
    assert_one_line_error(result, "model.name_or_path", "without '..'")
    assert not marker.exists() and not (tmp_path / "run").exists()
