"""lt-posttrain: post-training of Hugging Face causal LMs with Lightning."""

from lt_posttrain.api import run
from lt_posttrain.callbacks.hf_export import HFCheckpoint
from lt_posttrain.data.datamodule import InstructDataModule
from lt_posttrain.data.sources import Source
from lt_posttrain.trainers.sft import SFTModule

__all__ = ["HFCheckpoint", "InstructDataModule", "SFTModule", "Source", "run"]
__version__ = "0.1.0"
