"""Turning what jsonargparse and our own checks say about bad input into one line, with a suggestion."""

import difflib
import importlib
import inspect
import re
import sys
from typing import Iterable, Optional

from lt_posttrain.errors import UserError

_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")


class ConfigError(UserError):
    """A recipe or command line the parser rejected."""


def config_files(args: Optional[list]) -> list[str]:
    """The files given to ``--config`` in ``args`` (the command line, ``sys.argv[1:]``, if None), for naming the file
    of a YAML error."""
    args = list(sys.argv[1:] if args is None else args)
    files = [value for flag, value in zip(args, args[1:]) if flag in ("-c", "--config")]
    return files + [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=") and "{" not in arg]


def find_user_error(error: BaseException) -> Optional[UserError]:
    """The ``UserError`` that caused ``error`` (jsonargparse and Lightning wrap exceptions raised in ``__init__``)."""
    seen = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        stack.extend([current.__cause__, current.__context__])
    return None


def _class_keys(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def _suggest(unknown: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(unknown, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def explain_parser_error(
    message: str, known_options: Iterable[str] = (), config_files: Iterable[str] = (), command: str = "lt-posttrain fit"
) -> str:
    """One line for a jsonargparse error ``message``; ``known_options`` are the parser's ``--keys``,
    ``config_files`` the ``--config`` files given, ``command`` the command as typed (``lt-posttrain fit``), for the
    command that lists the valid keys."""
    keys = [key for key in re.findall(r'Parser key "([^"]+)"', message) if key not in ("model", "data")]
    groups = re.findall(r'Parser key "(model|data)"', message)
    prefix = ".".join(groups[:1] + keys)
    unknown = re.search(r"Option '([^']+)' is not accepted", message) or re.search(r"Key '([^']+)' is not expected", message)
    if unknown:
        name = unknown.group(1)
        class_path = re.search(r"class_path '([^']+)'", message)
        candidates = _class_keys(class_path.group(1)) if class_path else [o.lstrip("-") for o in known_options]
        full = f"{prefix}.{name}" if prefix else name
        suggestion = _suggest(name, candidates)
        if prefix and suggestion:
            suggestion = suggestion.replace("'", f"'{prefix}.", 1)
        section = re.match(r"(model|data)(\.|$)", prefix)
        lister = f"{command} --{section.group(1)}.help {class_path.group(1)}" if section and class_path else f"{command} --help"
        return f"unknown key '{full}'{suggestion}; '{lister}' lists the valid keys"
    not_accepted = re.search(r"does not accept option '([^']+)'", message)  # a misspelled section key in a file
    if not_accepted:
        name = not_accepted.group(1)
        keys = [option.lstrip("-") for option in known_options]
        return f"unknown key '{name}'{_suggest(name, keys)}; '{command} --help' lists the valid keys"
    unrecognized = re.search(r"[Uu]nrecognized arguments: (.*)", message)
    if unrecognized:
        options = [o for o in unrecognized.group(1).split() if o.startswith("-")] or unrecognized.group(1).split()
        first = options[0].split("=")[0] if options else unrecognized.group(1)
        keys = [option.lstrip("-") for option in known_options]
        return f"unknown key '{first.lstrip('-')}'{_suggest(first.lstrip('-'), keys)}; '{command} --help' lists the valid keys"
    if "Problems parsing config" in message:
        lines = [line.strip() for line in message.splitlines()[1:] if line.strip()]
        where = re.findall(r"line (\d+), column (\d+)", message)
        problem = next((line for line in lines if not line.startswith("in ")), "invalid syntax")
        at = f" at line {where[-1][0]}, column {where[-1][1]}" if where else ""
        files = ", ".join(config_files) or "the config"
        return f"malformed YAML in {files}: {problem}{at}"
    required = re.search(r"arguments are required: (.*)", message)
    if required:
        keys = [key.strip().split(".", 1)[-1] for key in required.group(1).split(",")]
        parent = re.search(r'Parser key "([^"]+)"', message)  # a class's own required argument
        keys = [f"{parent.group(1)}.{key}" for key in keys] if parent else keys
        example = " (e.g. --model.name_or_path and --data.sources)" if {"model", "data"} & set(keys) else ""
        return f"missing required key(s): {', '.join(keys)}{example}"
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith(_NOISE)]
    lines = [line for line in lines if not re.match(r'^(- )?(Problem with given class_path|Parser key ")', line)] or lines
    detail = re.sub(r'^(Parser key "[^"]+":\s*)+', "", lines[-1] if lines else message.strip())
    given = re.search(r"Given value: (.+)", message)
    if given and "Got value" not in detail:
        detail = f"{detail.lstrip('- ')}. Got value: {given.group(1).strip()[:80]}"
    return f"{prefix}: {detail}" if prefix and not detail.startswith(prefix) else detail
