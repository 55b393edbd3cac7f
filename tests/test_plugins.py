"""Plugins as pip-installed packages: a throwaway one is installed into this environment (offline), used from a
recipe by short names, listed by ``lt-posttrain plugins``; broken ones are listed with their reason, leave other
runs alone, and fail a run that asks for them in one line."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import gsm8k_chats, write_jsonl

from lt_posttrain.cli import main
from lt_posttrain.plugins import registry

PROBE = "lt_posttrain_probe"
PROBE_PACKAGE = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=70"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "lt-posttrain-probe"
        version = "0.1.0"

        [tool.setuptools]
        packages = ["lt_posttrain_probe"]

        [project.entry-points."lt_posttrain.trainers"]
        probe_trainer = "lt_posttrain_probe:ProbeTrainer"
        broken_import = "lt_posttrain_probe.needs_missing_dependency:Trainer"
        not_a_trainer = "lt_posttrain_probe:ProbeCallback"
        clash = "lt_posttrain_probe:ProbeTrainer"

        [project.entry-points."lt_posttrain.data_modules"]
        probe_data = "lt_posttrain_probe:ProbeDataModule"

        [project.entry-points."lt_posttrain.callbacks"]
        probe_callback = "lt_posttrain_probe:ProbeCallback"

        [project.entry-points."lt_posttrain.source_types"]
        probe_rows = "lt_posttrain_probe:ProbeSourceType"
        """,
    "lt_posttrain_probe/__init__.py": '''
        """A throwaway plugin: each part leaves a trace in a file, so a test can see that it ran."""
        import os
        from pathlib import Path

        import lightning as L
        from lt_posttrain import InstructDataModule, SFTModule
        from lt_posttrain.data.source_types.base import SourceType

        if os.environ.get("PROBE_IMPORT_LOG"):
            with open(os.environ["PROBE_IMPORT_LOG"], "a") as log:
                log.write("imported\\n")


        class ProbeTrainer(SFTModule):
            def __init__(self, *args, record_path: str = "", **kwargs):
                super().__init__(*args, **kwargs)
                self.record_path = record_path

            def loss(self, batch):
                loss = super().loss(batch)
                with open(self.record_path, "a") as record:
                    record.write(f"{float(loss)}\\n")
                return loss


        class ProbeDataModule(InstructDataModule):
            pass


        class ProbeCallback(L.Callback):
            def __init__(self, path: str = ""):
                self.path = path

            def on_train_end(self, trainer, module):
                Path(self.path).write_text(f"{type(module).__name__} {type(trainer.datamodule).__name__}")


        class ProbeSourceType(SourceType):
            def messages(self, row, index):
                return [{"role": "user", "content": row["q"]}, {"role": "assistant", "content": row["a"]}]
        ''',
    "lt_posttrain_probe/needs_missing_dependency.py": """
        import a_dependency_that_is_not_installed  # noqa: F401
        """,
}
CLASH_PACKAGE = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=70"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "lt-posttrain-probe-clash"
        version = "0.2.0"

        [tool.setuptools]
        packages = []

        [project.entry-points."lt_posttrain.trainers"]
        clash = "lt_posttrain_probe:ProbeTrainer"
        """,
}


def write_package(folder: Path, files: dict) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(text).lstrip())
    return folder


def pip(*args):
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def forget_plugins() -> None:
    importlib.invalidate_caches()
    registry.entry_points.cache_clear()
    for name in [name for name in sys.modules if name.startswith(PROBE)]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The probe plugins pip-installed into this environment for the module's tests, uninstalled after."""
    root = tmp_path_factory.mktemp("plugins")
    folders = [write_package(root / "probe", PROBE_PACKAGE), write_package(root / "clash", CLASH_PACKAGE)]
    pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", *map(str, folders))
    forget_plugins()
    try:
        yield
    finally:
        pip("uninstall", "--quiet", "--yes", "lt-posttrain-probe", "lt-posttrain-probe-clash")
        forget_plugins()


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "gsm8k.jsonl", gsm8k_chats(8))


def lt_posttrain(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lt_posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})  # fmt: skip


def test_plugins_lists_every_plugin_with_its_status(installed):
    result = lt_posttrain("plugins", "--format", "json")
    assert result.returncode == 0, result.stderr[-2000:]
    plugins = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(set(plugin) == {"group", "name", "value", "dist", "version", "status", "error"} for plugin in plugins)
    by_name = {(plugin["group"].rsplit(".", 1)[1], plugin["name"], plugin["dist"]): plugin for plugin in plugins}
    for group, name in [("trainers", "probe_trainer"), ("data_modules", "probe_data"), ("callbacks", "probe_callback"),
                        ("source_types", "probe_rows")]:  # fmt: skip
        plugin = by_name[(group, name, "lt-posttrain-probe")]
        assert (plugin["status"], plugin["error"], plugin["version"]) == ("ok", None, "0.1.0")
    assert by_name[("trainers", "sft", "lt-posttrain")]["status"] == "ok"
    messages = by_name[("source_types", "messages", "lt-posttrain")]
    assert messages["value"] == "lt_posttrain.data.source_types.messages:MessagesSourceType"
    broken = {name: by_name[("trainers", name, "lt-posttrain-probe")] for name in ("broken_import", "not_a_trainer")}
    broken["clash"] = by_name[("trainers", "clash", "lt-posttrain-probe")]
    assert all(plugin["status"] == "error" for plugin in broken.values())
    assert "No module named 'a_dependency_that_is_not_installed'" in broken["broken_import"]["error"]
    assert broken["not_a_trainer"]["error"] == "is not a subclass of lt_posttrain.SFTModule"
    assert by_name[("trainers", "clash", "lt-posttrain-probe-clash")]["error"] == broken["clash"]["error"]
    assert "lt-posttrain-probe 0.1.0" in broken["clash"]["error"]
    assert "lt-posttrain-probe-clash 0.2.0" in broken["clash"]["error"]

    table = lt_posttrain("plugins").stdout.splitlines()
    assert table[0].split() == ["group", "name", "target", "distribution", "status"]
    assert len([line for line in table if " error: " in line]) == 4 and len(table) == len(plugins) + 1


def test_fit_with_plugins_by_short_name_and_rerun_its_saved_config(installed, tiny_model_dir, tmp_path):
    """Trainer, data module, callback and source type named as the package registered them, in a YAML recipe; the
    saved config.yaml holds import paths and runs again, with ``--model NAME`` on the command line."""
    data = write_jsonl(tmp_path / "qa.jsonl", [{"q": row["messages"][0]["content"], "a": row["messages"][1]["content"]}
                                               for row in gsm8k_chats(8)])  # fmt: skip
    record, callback_file = tmp_path / "losses.txt", tmp_path / "callback.txt"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"class_path": "probe_trainer",
                  "init_args": {"name_or_path": str(tiny_model_dir), "record_path": str(record)}},
        "data": {"class_path": "probe_data",
                 "init_args": {"sources": [{"name_or_path": str(data), "type": "probe_rows"}], "batch_size": 2}},
        "trainer": {"accelerator": "cpu", "max_steps": 2, "accumulate_grad_batches": 2,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "probe_callback", "init_args": {"path": str(callback_file)}}],
                    "enable_checkpointing": False},
        "checkpoint": {"save_end_of_training": False},
    }))  # fmt: skip
    result = lt_posttrain("fit", "--config", recipe, env={"PROBE_IMPORT_LOG": str(tmp_path / "imports.txt")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "imports.txt").read_text() == "imported\n"
    assert len(record.read_text().splitlines()) == 4  # the plugin's loss ran for each micro-batch: 2 steps x 2
    assert callback_file.read_text() == "ProbeTrainer ProbeDataModule"
    saved_path = next((tmp_path / "run").rglob("config.yaml"))
    saved = yaml.safe_load(saved_path.read_text())
    assert saved["model"]["class_path"] == f"{PROBE}.ProbeTrainer"
    assert saved["data"]["class_path"] == f"{PROBE}.ProbeDataModule"
    assert saved["trainer"]["callbacks"][0]["class_path"] == f"{PROBE}.ProbeCallback"

    again = lt_posttrain("fit", "--config", saved_path, "--model", "probe_trainer", "--trainer.max_steps", "1",
                         "--trainer.default_root_dir", tmp_path / "again")  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(record.read_text().splitlines()) == 6


def test_an_unrelated_run_neither_imports_nor_minds_plugins(installed, tiny_model_dir, chats, tmp_path):
    log = tmp_path / "imports.txt"
    result = lt_posttrain("fit", "--model.name_or_path", tiny_model_dir, "--data.sources", f"[{chats}]",
                          "--trainer.callbacks+=LearningRateMonitor", "--print_config",
                          env={"PROBE_IMPORT_LOG": str(log)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert yaml.safe_load(result.stdout)["model"]["class_path"] == "lt_posttrain.SFTModule"
    names = "from lt_posttrain.plugins import groups, registry; print([registry.names(g) for g in groups.GROUPS])"
    listed = subprocess.run([sys.executable, "-c", names], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PROBE_IMPORT_LOG": str(log)})  # fmt: skip
    assert "probe_trainer" in listed.stdout, listed.stderr[-2000:]
    assert not log.exists()  # (the fit test shows the same variable does record an import)


def test_a_run_that_asks_for_a_broken_plugin_fails_in_one_line(installed, tiny_model_dir, chats):
    result = lt_posttrain("fit", "--model", "broken_import", "--model.name_or_path", tiny_model_dir, "--data.sources",
                          f"[{chats}]")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("lt-posttrain:")] == [
        (
            "lt-posttrain: error: trainer 'broken_import' (lt_posttrain_probe.needs_missing_dependency:Trainer, from "
            "lt-posttrain-probe 0.1.0) cannot be loaded: ModuleNotFoundError: No module named "
            "'a_dependency_that_is_not_installed'; fix or uninstall lt-posttrain-probe 0.1.0"
        )
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "not_a_trainer"], ("trainer 'not_a_trainer' (lt_posttrain_probe:ProbeCallback, from "
                                        "lt-posttrain-probe 0.1.0) is not a subclass of lt_posttrain.SFTModule")),
        (["--model={class_path: clash}"], "trainer 'clash' is claimed by 2 distributions"),
        (["--trainer.callbacks", "[probe_callbak]"], "unknown callback 'probe_callbak' (did you mean 'probe_callback'"),
        (["--data", "probe_trainer"], "unknown data module 'probe_trainer' (did you mean 'probe_data'?"),
    ],
)
def test_broken_or_unknown_names_are_one_line_errors(installed, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        main(["fit", *args, "--model.name_or_path", "unused", "--data.sources", "[unused.jsonl]"])
    assert exit.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"lt-posttrain: error: {message}"), errors


def test_short_names_become_import_paths_before_parsing(tmp_path):
    """The built-ins are registered like any plugin (``sft``, ``instruct``), so the rewriting is seen without
    installing anything: option values, inline YAML, and --config files (rewritten inline only when needed)."""
    from lt_posttrain.errors import UserError
    from lt_posttrain.plugins.short_names import expand_short_names

    sft, instruct = "lt_posttrain.trainers.sft.SFTModule", "lt_posttrain.data.datamodule.InstructDataModule"
    assert expand_short_names(["fit", "--model", "sft", "--data=instruct", "--model.help", "sft"]) == [
        "fit", "--model", sft, f"--data={instruct}", "--model.help", sft]  # fmt: skip
    inline = expand_short_names(["--model", "{class_path: sft, init_args: {learning_rate: 1e-4}}"])[1]
    assert json.loads(inline) == {"class_path": sft, "init_args": {"learning_rate": 1e-4}}
    kept = ["--model", "my_pkg.MyTrainer", "--trainer.callbacks+=LearningRateMonitor", "--trainer.callbacks", "null",
            "--data.sources", "[sft.jsonl]", "--model.name_or_path", "sft", "--model", "SFTModule"]  # fmt: skip
    assert expand_short_names(kept) == kept

    plain = tmp_path / "plain.yaml"
    plain.write_text("model:\n  class_path: my_pkg.MyTrainer\ndata:\n  sources: [a.jsonl]\n")
    assert expand_short_names(["-c", str(plain)]) == ["-c", str(plain)]
    short = tmp_path / "short.yaml"
    short.write_text("fit:\n  model: sft\n  trainer:\n    callbacks: [{class_path: LearningRateMonitor}]\n")
    assert json.loads(expand_short_names(["--config", str(short)])[1]) == {
        "fit": {"model": sft, "trainer": {"callbacks": [{"class_path": "LearningRateMonitor"}]}}}  # fmt: skip
    with pytest.raises(UserError, match=r"^unknown trainer 'sf' \(did you mean 'sft'\?"):
        expand_short_names(["--config", '{"model": {"class_path": "sf"}}'])
