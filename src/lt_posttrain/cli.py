"""The ``lt-posttrain`` command: Lightning's CLI for fit/validate/test/predict, one clear line for bad input."""

import sys
from typing import Optional

from lightning.pytorch.cli import LightningCLI

from lt_posttrain.callbacks.hf_export import HFCheckpoint
from lt_posttrain.data.datamodule import InstructDataModule
from lt_posttrain.errors import UserError
from lt_posttrain.trainers.sft import SFTModule

TRAINER_DEFAULTS = {"max_epochs": 1}


class PostTrainCLI(LightningCLI):
    """``LightningCLI`` with a ``checkpoint`` section (:class:`HFCheckpoint`) and the tokenizer handed to the data."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(HFCheckpoint, "checkpoint")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        connect = getattr(self.datamodule, "connect", None)
        if connect is not None and getattr(self.model, "tokenizer", None) is not None:
            connect(self.model.tokenizer)


def build_cli(args: Optional[list] = None, run: bool = True) -> PostTrainCLI:
    """The CLI object for ``args`` (``sys.argv`` if None); with ``run`` the subcommand runs too."""
    return PostTrainCLI(
        SFTModule,
        InstructDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs={"prog": "lt-posttrain"},
        args=args,
        run=run,
    )


def main(args: Optional[list] = None) -> None:
    try:
        build_cli(args)
    except UserError as error:
        print(f"lt-posttrain: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
