"""The ``lt-posttrain`` command: Lightning's CLI for fit/validate/test/predict, one clear line for bad input."""

import contextlib
import io
import sys
from typing import Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lt_posttrain.callbacks.hf_export import HFCheckpoint
from lt_posttrain.callbacks.predictions import PredictionWriter
from lt_posttrain.callbacks.throughput import ThroughputMeter
from lt_posttrain.cli_errors import ConfigError, explain_parser_error, find_user_error
from lt_posttrain.data.datamodule import InstructDataModule
from lt_posttrain.trainers.sft import SFTModule

TRAINER_DEFAULTS = {"max_epochs": 1}


class PostTrainCLI(LightningCLI):
    """``LightningCLI`` with ``checkpoint`` (:class:`HFCheckpoint`), ``predictions`` (:class:`PredictionWriter`) and
    ``throughput`` (:class:`ThroughputMeter`) sections, and the model's tokenizer handed to the data module."""

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse as Lightning does, but turn the parser's usage-and-error output into one :class:`ConfigError`."""
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):
                super().parse_arguments(parser, args)
        except SystemExit as exit:
            if exit.code in (0, None) or "error:" not in printed.getvalue():
                sys.stderr.write(printed.getvalue())
                raise
            message = printed.getvalue().split("error:", 1)[1]
            raise ConfigError(explain_parser_error(message, _option_names(parser), _config_files(args))) from None
        sys.stderr.write(printed.getvalue())

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(HFCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(ThroughputMeter, "throughput")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        connect = getattr(self.datamodule, "connect", None)
        if connect is not None and getattr(self.model, "tokenizer", None) is not None:
            connect(self.model.tokenizer)


def _option_names(parser: LightningArgumentParser) -> list[str]:
    parsers = [parser, *getattr(parser._subcommands_action, "_name_parser_map", {}).values()]
    return sorted({option for each in parsers for option in each._option_string_actions if option.startswith("--")})


def _config_files(args) -> list[str]:
    args = list(sys.argv[1:] if args is None else args)
    files = [value for flag, value in zip(args, args[1:]) if flag in ("-c", "--config")]
    return files + [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=") and "{" not in arg]


def build_cli(args: Optional[list] = None, run: bool = True) -> PostTrainCLI:
    """The CLI object for ``args`` (``sys.argv`` if None); with ``run`` the subcommand runs too."""
    return PostTrainCLI(
        SFTModule,
        InstructDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs={"prog": "lt-posttrain", "allow_abbrev": False},
        args=args,
        run=run,
    )


def main(args: Optional[list] = None) -> None:
    """``lt-posttrain``: ``fit``/``validate``/``test``/``predict`` go to Lightning's CLI, ``data ...`` to
    :mod:`lt_posttrain.commands.data` (commands that are not Trainer methods, so not LightningCLI subcommands)."""
    argv = sys.argv[1:] if args is None else [str(arg) for arg in args]
    try:
        if argv[:1] == ["data"]:
            from lt_posttrain.commands import data

            data.run(argv[1:])
        elif argv in (["-h"], ["--help"]):
            try:
                build_cli(args)
            finally:
                print("\nother commands:\n  data {prepare,preview}  tokenize and count a recipe's data, or show its "
                      "samples (lt-posttrain data --help)")  # fmt: skip
        else:
            build_cli(args)
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        print(f"lt-posttrain: error: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
