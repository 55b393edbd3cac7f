"""``lt-posttrain plugins``: every plugin registered under lt-posttrain's entry-point groups (the built-ins too), its
distribution, and whether it can be used; a broken one is listed with its reason."""

import json
import os
import sys
from typing import Literal

from jsonargparse import ArgumentError, ArgumentParser

from lt_posttrain.cli.parse_errors import ConfigError, explain_parser_error
from lt_posttrain.plugins.groups import GROUPS
from lt_posttrain.plugins.registry import PluginInfo, inspect_group

COLUMNS = ("group", "name", "target", "distribution", "status")


def list_plugins(format: Literal["text", "json"] = "text") -> None:
    """Print every registered plugin: group, name, target (``module:Class``), distribution and version, status.

    Args:
        format: ``text`` (a table; a broken plugin's status is ``error:`` and its reason) or ``json`` (one
            ``{"group", "name", "value", "dist", "version", "status", "error"}`` object per line).
    """
    infos = [info for group in GROUPS for info in inspect_group(group)]
    if format == "json":
        for info in infos:
            fields = ("group", "name", "value", "dist", "version", "status", "error")
            print(json.dumps({field: getattr(info, field) for field in fields}))
    else:
        print(format_table(infos))


def format_table(infos: list[PluginInfo]) -> str:
    """``infos`` as an aligned table, one plugin per line."""
    table = [list(COLUMNS)]
    for info in infos:
        dist = f"{info.dist} {info.version}" if info.dist else "-"
        table.append([info.group, info.name, info.value, dist, "ok" if info.error is None else f"error: {info.error}"])
    widths = [max(len(row[column]) for row in table) for column in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join([*map(str.ljust, row[:-1], widths), row[-1]]) for row in table)


def run(args: list[str]) -> None:
    """Run ``lt-posttrain plugins ARGS``; a bad option is raised as a ``ConfigError`` (a ``UserError``)."""
    parser = ArgumentParser(prog="lt-posttrain plugins", description=__doc__, exit_on_error=False)
    parser.add_function_arguments(list_plugins)
    try:
        config = parser.parse_args([str(arg) for arg in args])
    except ArgumentError as error:
        raise ConfigError(explain_parser_error(str(error), parser._option_string_actions)) from None
    try:
        list_plugins(**config.as_dict())
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
