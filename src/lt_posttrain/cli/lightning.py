"""Lightning's CLI for fit/validate/test/predict: the recipe's sections, one clear line for bad input."""

import contextlib
import io
import sys
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lt_posttrain.callbacks.hf_export import HFCheckpoint
from lt_posttrain.callbacks.nonfinite import NonFiniteLossGuard
from lt_posttrain.callbacks.predictions import PredictionWriter
from lt_posttrain.callbacks.progress import progress_bar
from lt_posttrain.callbacks.random_state import RandomStateCheckpoint
from lt_posttrain.callbacks.throughput import ThroughputMeter
from lt_posttrain.callbacks.training_state import TrainingStateCheckpoint, checkpoint_states_file
from lt_posttrain.cli.help import asks_for_help, print_class_keys
from lt_posttrain.cli.parse_errors import ConfigError, config_files, explain_parser_error
from lt_posttrain.data.datamodule import InstructDataModule
from lt_posttrain.errors import UserError
from lt_posttrain.plugins.short_names import expand_short_names
from lt_posttrain.trainers.sft import SFTModule
from lt_posttrain.training.checkpoint_io import CHECKPOINT_READ_ERRORS, checkpoint_read_error, refused_by_weights_only
from lt_posttrain.training.run_folder import check_writable
from lt_posttrain.training.strategy import check_strategy, prepare_strategy

# the model summary's table (and its "Total FLOPs: 0") says less than the trainer's own line of parameter counts
TRAINER_DEFAULTS = {"max_epochs": 1, "enable_model_summary": False}
CLASS_SECTIONS = {"model": "lt_posttrain.SFTModule", "data": "lt_posttrain.InstructDataModule"}  # their defaults


class PostTrainCLI(LightningCLI):
    """``LightningCLI`` with ``checkpoint`` (:class:`HFCheckpoint`), ``training_state``
    (:class:`TrainingStateCheckpoint`), ``nonfinite_loss`` (:class:`NonFiniteLossGuard`), ``predictions``
    (:class:`PredictionWriter`) and ``throughput`` (:class:`ThroughputMeter`) sections, random states in every
    checkpoint (:class:`RandomStateCheckpoint`), and the model's tokenizer handed to the data module."""

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse as Lightning does, but turn the parser's usage-and-error output into one :class:`ConfigError`."""
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):
                super().parse_arguments(parser, args)
        except SystemExit as exit:
            argv = list(sys.argv[1:] if args is None else args)
            if exit.code in (0, None) or "error:" not in printed.getvalue():
                sys.stderr.write(printed.getvalue())
                subcommand = _subcommand_parsers(parser).get(argv[0] if argv else "")
                if exit.code in (0, None) and subcommand is not None and asks_for_help(argv):
                    print_class_keys(subcommand, argv, CLASS_SECTIONS, f"{parser.prog} {argv[0]}")
                raise
            message = printed.getvalue().split("error:", 1)[1]
            command = f"{parser.prog} {argv[0]}" if argv[:1] and argv[0] in _subcommand_parsers(parser) else parser.prog
            raise ConfigError(explain_parser_error(message, _option_names(parser), config_files(args), command)) from None
        sys.stderr.write(printed.getvalue())

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(NonFiniteLossGuard, "nonfinite_loss")  # first: it may stop an export
        parser.add_lightning_class_args(HFCheckpoint, "checkpoint")
        parser.add_lightning_class_args(TrainingStateCheckpoint, "training_state")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(ThroughputMeter, "throughput")

    def _parse_ckpt_path(self) -> None:
        """Lightning's (a ``--ckpt_path`` file's hyper-parameters update the model section), for a checkpoint folder
        (DeepSpeed's) too; one that cannot be read is one line. Lightning reads it weights-only whatever
        ``--weights_only`` says: with ``false``, a checkpoint with pickled objects is left to the trainer, which
        honours it."""
        config = self.config.get(self.config.get("subcommand") or "", {})
        path = read = config.get("ckpt_path")
        try:
            if path and Path(path).is_dir():
                read = checkpoint_states_file(Path(path))
                if read is None:
                    raise UserError(
                        f"--ckpt_path {path!r}: a folder, but not a complete checkpoint (a DeepSpeed checkpoint folder "
                        "holds a 'latest' file, written last); give a step-N.ckpt file or folder from training_state"
                    )
                # mapped, not read: beside the hyper-parameters, DeepSpeed's states file holds the model's weights
                self._update_model_section(torch.load(read, map_location="cpu", weights_only=True, mmap=True))
            else:
                super()._parse_ckpt_path()
        except UserError:
            raise
        except CHECKPOINT_READ_ERRORS as error:
            if refused_by_weights_only(error) and config.get("weights_only") is False:
                return
            raise checkpoint_read_error(read, error) from error

    def _update_model_section(self, checkpoint: dict) -> None:
        """What Lightning's ``_parse_ckpt_path`` does with the contents of a checkpoint file."""
        hparams = checkpoint.get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        if hparams:
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if config.get("enable_checkpointing") is False:  # Lightning refuses a ModelCheckpoint then
            callbacks = [callback for callback in callbacks if not isinstance(callback, TrainingStateCheckpoint)]
        recipe_bar = any(isinstance(callback, ProgressBar) for callback in config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not recipe_bar:  # Lightning refuses a second one
            callbacks = [*callbacks, progress_bar()]  # after the throughput meter, whose tokens/s it prints
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        """The run's folders, checked before the data is prepared (Lightning would fail later, with a traceback)."""
        if self.trainer.is_global_zero:
            check_writable(self.trainer.default_root_dir, "trainer.default_root_dir")
            if self.trainer.log_dir:
                check_writable(self.trainer.log_dir, "the log folder", "set trainer.logger's save_dir elsewhere")

    def before_instantiate_classes(self) -> None:
        """A strategy that cannot run here (DeepSpeed not installed, no GPU, ...) is one line before anything loads."""
        subcommand = self.config.get("subcommand")
        check_strategy((self.config[subcommand] if subcommand else self.config).get("trainer"))

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        prepare_strategy(self.trainer.strategy, micro_batch_size=getattr(self.datamodule, "batch_size", 1))
        connect = getattr(self.datamodule, "connect", None)
        if connect is not None and getattr(self.model, "tokenizer", None) is not None:
            connect(self.model.tokenizer)


def _subcommand_parsers(parser: LightningArgumentParser) -> dict:
    return getattr(parser._subcommands_action, "_name_parser_map", {})


def _option_names(parser: LightningArgumentParser) -> list[str]:
    parsers = [parser, *_subcommand_parsers(parser).values()]
    return sorted({option for each in parsers for option in each._option_string_actions if option.startswith("--")})


def build_cli(args: Optional[list] = None, run: bool = True) -> PostTrainCLI:
    """The CLI object for ``args`` (``sys.argv`` if None); with ``run`` the subcommand runs too. Plugins' short
    names (``--model dpo``) are expanded to import paths first."""
    if args is None:  # rewritten in place: Lightning warns when given args while sys.argv holds a command line
        sys.argv[1:] = expand_short_names(sys.argv[1:])
    else:
        args = expand_short_names(args)
    return PostTrainCLI(
        SFTModule,
        InstructDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [RandomStateCheckpoint()]},
        parser_kwargs={"prog": "lt-posttrain", "allow_abbrev": False},
        args=args,
        run=run,
    )
