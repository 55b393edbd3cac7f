"""The ``lt-posttrain`` command, the top floor: nothing else in the package imports it.

``fit``/``validate``/``test``/``predict`` go to Lightning's CLI (``lightning``); ``data`` and ``plugins`` are plain
functions (``data``, ``plugins``); bad input becomes one line (``parse_errors``).
"""

import sys
from typing import Optional

from lt_posttrain.callbacks.progress import output_is_terminal
from lt_posttrain.cli.lightning import build_cli
from lt_posttrain.cli.parse_errors import find_user_error
from lt_posttrain.cli.quiet import quiet_libraries
from lt_posttrain.plugins.short_names import expand_short_names
from lt_posttrain.training.strategy import leave_process_group


def main(args: Optional[list] = None) -> None:
    """``lt-posttrain``: ``fit``/``validate``/``test``/``predict`` go to Lightning's CLI, ``data ...`` to
    :mod:`lt_posttrain.cli.data` and ``plugins`` to :mod:`lt_posttrain.cli.plugins` (commands that are not
    Trainer methods, so not LightningCLI subcommands)."""
    argv = sys.argv[1:] if args is None else [str(arg) for arg in args]
    quiet_libraries(terminal=output_is_terminal())
    try:
        if argv[:1] == ["data"]:
            from lt_posttrain.cli import data

            data.run(expand_short_names(argv[1:]))
        elif argv[:1] == ["plugins"]:
            from lt_posttrain.cli import plugins

            plugins.run(argv[1:])
        elif argv in (["-h"], ["--help"]):
            try:
                build_cli(args)
            finally:
                print("\nother commands:\n  data {prepare,preview}  tokenize and count a recipe's data, or show its "
                      "samples (lt-posttrain data --help)\n  plugins                 list the installed trainers, data "
                      "modules, callbacks and source types (docs/plugins.md)")  # fmt: skip
        else:
            build_cli(args)
            leave_process_group()
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        print(f"lt-posttrain: error: {user_error}", file=sys.stderr)
        sys.exit(2)

