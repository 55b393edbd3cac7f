"""Lightning's CLI for fit/validate/test/predict: the recipe's sections, one clear line for bad input."""

import contextlib
import io
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import yaml
from lightning.pytorch.callbacks import LambdaCallback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from lt_posttrain.callbacks.hf_export import HFCheckpoint
from lt_posttrain.callbacks.nonfinite import NonFiniteLossGuard
from lt_posttrain.callbacks.predictions import PredictionWriter
from lt_posttrain.callbacks.progress import progress_bar
from lt_posttrain.callbacks.random_state import RandomStateCheckpoint
from lt_posttrain.callbacks.throughput import ThroughputMeter
from lt_posttrain.callbacks.recipe import RecipeInCheckpoint
from lt_posttrain.callbacks.training_state import (
    TrainingStateCheckpoint,
    checkpoint_states_file,
    default_dirpath,
    newest_checkpoint,
)
from lt_posttrain.callbacks.validation_answers import ValidationAnswers
from lt_posttrain.cli.help import asks_for_help, print_class_keys
from lt_posttrain.cli.parse_errors import ConfigError, config_files, explain_parser_error
from lt_posttrain.data.datamodule import InstructDataModule
from lt_posttrain.errors import UserError
from lt_posttrain.plugins.short_names import expand_short_names
from lt_posttrain.ranges import check_ranges
from lt_posttrain.trainers.sft import SFTModule
from lt_posttrain.training.checkpoint_io import (
    CHECKPOINT_READ_ERRORS,
    checkpoint_read_error,
    read_checkpoint,
    refused_by_weights_only,
)
from lt_posttrain.training.resume import (
    RECIPE_KEY,
    describe_changes,
    flatten_recipe,
    recipe_changes,
    recipe_of_hyper_parameters,
    refuse_fixed_changes,
)
from lt_posttrain.training.run_folder import RunFolder, check_writable
from lt_posttrain.training.strategy import check_strategy, prepare_strategy

# the model summary's table (and its "Total FLOPs: 0") says less than the trainer's own line of parameter counts
TRAINER_DEFAULTS = {"max_epochs": 1, "enable_model_summary": False}
CLASS_SECTIONS = {"model": "lt_posttrain.SFTModule", "data": "lt_posttrain.InstructDataModule"}  # their defaults


class SaveConfigAtTrainStart(SaveConfigCallback):
    """Lightning's ``config.yaml``, written for ``fit`` when training starts rather than at setup: a run refused for
    its recipe, model or data before its first step writes none (and replaces no earlier one)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        super().setup(trainer, pl_module, "fit")


class PostTrainCLI(LightningCLI):
    """``LightningCLI`` with ``checkpoint`` (:class:`HFCheckpoint`), ``training_state``
    (:class:`TrainingStateCheckpoint`), ``nonfinite_loss`` (:class:`NonFiniteLossGuard`), ``predictions``
    (:class:`PredictionWriter`), ``throughput`` (:class:`ThroughputMeter`) and ``validation_answers``
    (:class:`ValidationAnswers`) sections, random states in every
    checkpoint (:class:`RandomStateCheckpoint`), and the model's tokenizer handed to the data module. A ``fit`` owns
    its ``trainer.default_root_dir`` while it runs (:class:`RunFolder`)."""

    def __init__(self, *args, **kwargs):
        arguments = kwargs.get("args")
        self.command = shlex.join(["lt-posttrain", *map(str, sys.argv[1:] if arguments is None else arguments)])
        self.run_folder: Optional[RunFolder] = None
        self._training_started = False
        super().__init__(*args, **kwargs)

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
        subcommand = self.config.get("subcommand")
        check_ranges(self.config[subcommand] if subcommand else self.config)  # before a checkpoint or model is read

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(NonFiniteLossGuard, "nonfinite_loss")  # first: it may stop an export
        parser.add_lightning_class_args(HFCheckpoint, "checkpoint")
        parser.add_lightning_class_args(TrainingStateCheckpoint, "training_state")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(ThroughputMeter, "throughput")
        parser.add_lightning_class_args(ValidationAnswers, "validation_answers")

    def _parse_ckpt_path(self) -> None:
        """Instead of Lightning's (a ``--ckpt_path`` file's hyper-parameters update the model section, but not for
        ``last``): the recipe is what runs, whatever the checkpoint; its differences from the checkpoint's recipe are
        listed in one line, and those a resume cannot make refused (``training/resume.py``). The checkpoint is read
        mapped and weights-only, a file or a checkpoint folder (DeepSpeed's), and one that cannot be read is one line;
        with ``--weights_only false``, one with pickled objects is left to the trainer, which honours it."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand or "", {})
        path = config.get("ckpt_path")
        read = self._checkpoint_states(path, config) if path else None
        if read is None:
            return
        try:
            checkpoint = read_checkpoint(read, resume=subcommand == "fit", in_folder=read != Path(path))
        except CHECKPOINT_READ_ERRORS as error:
            if refused_by_weights_only(error, read) and config.get("weights_only") is False:
                return
            raise checkpoint_read_error(read, error) from error
        saved = checkpoint.get(RECIPE_KEY)
        saved = flatten_recipe(saved) if isinstance(saved, dict) else recipe_of_hyper_parameters(
            checkpoint.get("hyper_parameters") or {})  # fmt: skip
        changes = recipe_changes(saved, flatten_recipe(self._recipe()))
        shown = str(read if Path(path).is_dir() or path == "last" else path)
        refuse_fixed_changes(changes, shown)
        if changes:
            rank_zero_info(describe_changes(changes, shown, checkpoint.get("global_step")))

    def _checkpoint_states(self, path: str, config) -> Optional[Path]:
        """The file of ``--ckpt_path`` that holds the hyper-parameters and recipe: the file itself, the states file
        of a checkpoint folder, or for ``last`` that of the newest checkpoint; None if there is nothing to read
        (``last`` before any checkpoint, or a path Lightning resolves itself: ``best``, ``hpc``, a URL)."""
        if path == "last":
            root = (config.get("trainer") or {}).get("default_root_dir")
            folder = (config.get("training_state") or {}).get("dirpath") or default_dirpath(root)
            newest = newest_checkpoint(Path(folder))
            if newest is None:
                return None
            return checkpoint_states_file(newest) if newest.is_dir() else newest
        if path in ("best", "hpc", "registry") or "://" in str(path):
            return None
        if Path(path).is_dir():
            states = checkpoint_states_file(Path(path))
            if states is None:
                raise UserError(
                    f"--ckpt_path {path!r}: a folder, but not a complete checkpoint (a DeepSpeed checkpoint folder "
                    "holds a 'latest' file, written last); give a step-N.ckpt file or folder from training_state"
                )
            return states
        if not Path(path).is_file():
            raise UserError(f"--ckpt_path {str(path)!r}: no such checkpoint file")
        return Path(path)

    def _recipe(self) -> dict:
        """The recipe of the command being run, in plain values (``config.yaml``'s content)."""
        dump = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False, format="yaml"))
        return dump[self.config.subcommand] if "subcommand" in self.config else dump

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if config.get("enable_checkpointing") is False:  # Lightning refuses a ModelCheckpoint then
            callbacks = [callback for callback in callbacks if not isinstance(callback, TrainingStateCheckpoint)]
        callbacks = [*callbacks, RecipeInCheckpoint(self._recipe())]
        recipe_bar = any(isinstance(callback, ProgressBar) for callback in config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not recipe_bar:  # Lightning refuses a second one
            callbacks = [*callbacks, progress_bar()]  # after the throughput meter, whose tokens/s it prints
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's, with the run folder given up at the end, and what the run created removed if it failed before
        its first training step."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if self.run_folder is not None:
                self.run_folder.release(failed_before_training=not self._training_started)
            raise
        if self.run_folder is not None:
            self.run_folder.release()

    def before_fit(self) -> None:
        """The run folder claimed (:meth:`claim_run_folder`) and the log folder checked, before the data is prepared
        (Lightning would fail later, with a traceback)."""
        started = LambdaCallback(on_train_start=lambda *_: setattr(self, "_training_started", True))
        self.trainer.callbacks.append(started)
        if self.trainer.is_global_zero:
            self.claim_run_folder()
            if self.trainer.log_dir:
                check_writable(self.trainer.log_dir, "the log folder", "set trainer.logger's save_dir elsewhere")

    def claim_run_folder(self) -> None:
        """Own ``trainer.default_root_dir`` (one run at a time; a stale lock taken over), refuse a fresh run over the
        checkpoints of an earlier one, and remove what a killed run left half-written."""
        trainer = self.trainer
        states = next((c for c in trainer.callbacks if isinstance(c, TrainingStateCheckpoint)), None)
        export = next((c for c in trainer.callbacks if isinstance(c, HFCheckpoint)), None)
        exporting = export is not None and (export.save_end_of_training or export.save_every_n_steps)
        created = [Path(states.resolved_dirpath(trainer))] if states is not None else []
        created += [export.resolved_output_dir(trainer)] if exporting else []
        log_dir = Path(trainer.log_dir) if trainer.log_dir else None
        own = [log_dir] if trainer.loggers and log_dir and log_dir != Path(trainer.default_root_dir) else []
        self.run_folder = RunFolder(trainer.default_root_dir, self.command, [*created, *own], own)
        note = self.run_folder.claim()
        if note:
            rank_zero_info(note)
        if states is not None and not self.config[self.config.subcommand].get("ckpt_path"):
            states.refuse_earlier_checkpoints(trainer)
        removed = (states.remove_leftovers(trainer) if states is not None else []) + (
            export.remove_leftovers(trainer) if exporting else []
        )
        if removed:
            rank_zero_info(f"removed what a stopped run left half-written: {', '.join(removed)}")

    def before_instantiate_classes(self) -> None:
        """A strategy that cannot run here (DeepSpeed not installed, no GPU, ...) is one line before anything loads."""
        subcommand = self.config.get("subcommand")
        check_strategy((self.config[subcommand] if subcommand else self.config).get("trainer"))

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        prepare_strategy(self.trainer.strategy, micro_batch_size=getattr(self.datamodule, "batch_size", 1))
        check = getattr(self.model, "check_sequence_parallel", None)
        if check is not None and self.subcommand != "predict":  # before any process of a multi-rank run starts
            check(self.trainer, self.datamodule)
        connect = getattr(self.datamodule, "connect", None)
        if connect is not None and getattr(self.model, "tokenizer", None) is not None:
            connect(self.model.tokenizer)


def _subcommand_parsers(parser: LightningArgumentParser) -> dict:
    return getattr(parser._subcommands_action, "_name_parser_map", {})


def _option_names(parser: LightningArgumentParser) -> list[str]:
    parsers = [parser, *_subcommand_parsers(parser).values()]
    return sorted({option for each in parsers for option in each._option_string_actions if option.startswith("--")})


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def join_negative_numbers(args: list) -> list:
    """``--key -1e-3`` as ``--key=-1e-3``: argparse takes a negative number in exponent form (or ``-inf``) after an
    option for another option, and reports the key as missing its value; joined, the value reaches the range check,
    which names the key and says what it accepts."""
    joined: list = []
    for arg in map(str, args):
        previous = joined[-1] if joined else ""
        if NEGATIVE_NUMBER.match(arg) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={arg}"
        else:
            joined.append(arg)
    return joined


def build_cli(args: Optional[list] = None, run: bool = True) -> PostTrainCLI:
    """The CLI object for ``args`` (``sys.argv`` if None); with ``run`` the subcommand runs too. Plugins' short
    names (``--model dpo``) are expanded to import paths first."""
    if args is None:  # rewritten in place: Lightning warns when given args while sys.argv holds a command line
        sys.argv[1:] = join_negative_numbers(expand_short_names(sys.argv[1:]))
    else:
        args = join_negative_numbers(expand_short_names(args))
    return PostTrainCLI(
        SFTModule,
        InstructDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigAtTrainStart,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [RandomStateCheckpoint()]},
        parser_kwargs={"prog": "lt-posttrain", "allow_abbrev": False},
        args=args,
        run=run,
    )
