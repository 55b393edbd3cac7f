"""Short names where a recipe chooses a class: ``--model dpo``, ``model: {class_path: dpo, init_args: ...}``,
``data: {class_path: preference}``, ``trainer.callbacks: [{class_path: my_callback}]``.

jsonargparse resolves a bare ``class_path`` only against the ``__name__`` of subclasses already imported, and has no
alias hook. So before it parses, each registered name is replaced by the import path of its class (importing that
plugin alone, and failing in one line if it is broken): in the values of ``--model``, ``--data`` and
``--trainer.callbacks`` (and their ``.class_path``/``.help``), and in ``--config`` documents (files or inline). A
``--config`` file that holds a short name is passed on inline, rewritten. Everything else is left as it is, so a
dotted import path and the names jsonargparse knows (``SFTModule``, ``LearningRateMonitor``) keep working, and the
saved ``config.yaml`` holds full import paths.
"""

import json
import re
from pathlib import Path
from typing import Callable, Optional

from jsonargparse import get_loader

from lt_posttrain.errors import UserError
from lt_posttrain.plugins import registry
from lt_posttrain.plugins.groups import CALLBACKS, DATA_MODULES, TRAINERS
from lt_posttrain.plugins.registry import PluginGroup

POSITIONS = {"model": TRAINERS, "data": DATA_MODULES, "trainer.callbacks": CALLBACKS}
SUBCOMMANDS = ("fit", "validate", "test", "predict")  # a --config given before the subcommand nests under it
_NAME = re.compile(r"[A-Za-z_][\w-]*")


def expand_short_names(args: list[str]) -> list[str]:
    """``args`` (a command line, without the program name) with the short names of registered plugins replaced by
    their classes' import paths.

    Raises:
        UserError: a short name that is unknown, or whose plugin cannot be used (with the reason).
    """
    expanded: list[str] = []
    pending: Optional[Callable[[str], str]] = None  # what expands the value that follows an option
    for arg in map(str, args):
        if pending is not None:
            expanded.append(pending(arg))
            pending = None
            continue
        option, equals, value = arg.partition("=")
        expand = _expander(option)
        if expand is None:
            expanded.append(arg)
        elif equals:
            expanded.append(f"{option}={expand(value)}")
        else:
            expanded.append(arg)
            pending = expand
    return expanded


def _expander(option: str) -> Optional[Callable[[str], str]]:
    if option in ("-c", "--config"):
        return _expand_config
    for position, group in POSITIONS.items():
        if option in (f"--{position}", f"--{position}+", f"--{position}.class_path", f"--{position}.help"):
            return lambda text, group=group: _expand_text(text, group)
    return None


def _expand_text(text: str, group: PluginGroup) -> str:
    """A command-line value: a bare name, or an inline YAML/JSON mapping or list (a dotted path or a file is kept)."""
    if not (_NAME.fullmatch(text) or text.lstrip().startswith(("{", "["))):
        return text
    value = _load_yaml(text)  # so that null, true, ... are not taken for names
    expanded = _expand_value(value, group)
    if expanded == value:
        return text
    return expanded if isinstance(expanded, str) else json.dumps(expanded)


def _expand_config(text: str) -> str:
    """A ``--config`` value: a file or an inline document; rewritten (inline) only if it holds a short name."""
    try:
        content = Path(text).read_text() if Path(text).is_file() else text
    except OSError:  # an inline document too long to be a file name
        content = text
    document = _load_yaml(content)
    if not isinstance(document, dict):
        return text
    expanded = _expand_document(document)
    return text if expanded == document else json.dumps(expanded)


def _expand_document(document: dict) -> dict:
    document = dict(document)
    for subcommand in SUBCOMMANDS:
        if isinstance(document.get(subcommand), dict):
            document[subcommand] = _expand_document(document[subcommand])
    for key in ("model", "data"):
        if key in document:
            document[key] = _expand_value(document[key], POSITIONS[key])
    trainer = document.get("trainer")
    if isinstance(trainer, dict) and "callbacks" in trainer:
        document["trainer"] = {**trainer, "callbacks": _expand_value(trainer["callbacks"], CALLBACKS)}
    return document


def _expand_value(value, group: PluginGroup):
    """A loaded value at a class position: a name, a ``{class_path, init_args}`` mapping, or a list of them."""
    if isinstance(value, list):
        return [_expand_value(item, group) for item in value]
    if isinstance(value, dict) and isinstance(value.get("class_path"), str):
        return {**value, "class_path": _expand_value(value["class_path"], group)}
    if isinstance(value, str) and _NAME.fullmatch(value):
        return _import_path(value, group)
    return value


def _import_path(name: str, group: PluginGroup) -> str:
    """The import path of the class ``name`` is registered for; a name jsonargparse resolves itself is kept."""
    if name not in registry.entry_points(group.name) and _is_loaded_subclass_name(name, group.base_class()):
        return name
    try:
        cls = registry.load(group, name)
    except registry.PluginError as error:
        raise UserError(str(error)) from None
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_loaded_subclass_name(name: str, base: type) -> bool:
    stack = [base]
    while stack:
        cls = stack.pop()
        if cls.__name__ == name:
            return True
        stack.extend(cls.__subclasses__())
    return False


def _load_yaml(text: str):
    try:
        return get_loader("yaml")(text)
    except Exception:  # malformed: left for the parser, which names the file and line
        return None
