"""The keys of a recipe's class sections (``model``, ``data``) in a command's ``--help``.

A section that takes a class or any subclass of it is listed by jsonargparse as ``--model CLASS`` and
``--model.help CLASS`` alone: its keys appear only in the second's output. ``--help`` prints that output after its
own, for the class the command line names or the default one.
"""

import contextlib
import io
import re
from typing import Optional

HELP_FLAGS = ("-h", "--help")


def asks_for_help(args: list[str]) -> bool:
    """Whether ``args`` (a command line without the program) ask for a command's help."""
    return any(arg in HELP_FLAGS for arg in args)


def chosen_class(args: list[str], section: str, default: str) -> str:
    """The class ``--SECTION CLASS`` (or ``--SECTION=CLASS``) names in ``args``, else ``default``; a value that is not
    an import path (a config file, inline YAML) leaves the default."""
    flag = f"--{section}"
    values = [value for option, value in zip(args, args[1:]) if option == flag]
    values += [arg.split("=", 1)[1] for arg in args if arg.startswith(f"{flag}=")]
    paths = [value for value in values if re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", value)]
    return paths[-1] if paths else default


def class_keys_help(parser, section: str, class_path: str) -> Optional[str]:
    """What ``--SECTION.help CLASS_PATH`` prints for ``parser``, without its usage lines (the keys, grouped), or None
    if the parser has no such option."""
    if f"--{section}.help" not in parser._option_string_actions:
        return None
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        parser.parse_args([f"--{section}.help", class_path])
    _usage, found, keys = printed.getvalue().partition("\n\nHelp for ")
    return keys.split("\n\n", 1)[1].rstrip() if found and "\n\n" in keys else None


def print_class_keys(parser, args: list[str], sections: dict[str, str], command: str) -> None:
    """Print, after ``parser``'s own help, the keys of each class section.

    Args:
        parser: the command's parser (a subcommand's, for ``fit``).
        args: the command line, for the classes it chooses.
        sections: section name -> default class path, e.g. ``{"model": "lt_posttrain.SFTModule"}``.
        command: the command as typed, e.g. ``lt-posttrain fit``, for the line that says how to list another class.
    """
    for section, default in sections.items():
        class_path = chosen_class(args, section, default)
        keys = class_keys_help(parser, section, class_path)
        if keys:
            print(f"\nkeys of --{section} {class_path} (another class's: {command} --{section}.help CLASS)\n{keys}")
