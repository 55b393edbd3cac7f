"""lt-posttrain: post-training of Hugging Face causal LMs with Lightning.

This module is the public surface: a plugin (a trainer, a data module, a source type) imports what it needs from
``lt_posttrain`` and from nowhere deeper; its tests may also use :mod:`lt_posttrain.testing`. The names in
``__all__`` keep their meaning within a major version of ``__api_version__`` (``docs/plugins.md`` says how it is
versioned); every other module is internal and may change in any release. ``import lt_posttrain`` does not import the
command line (:func:`run` does, when called).
"""

from lt_posttrain.api import run
from lt_posttrain.batch import (
    IGNORE_INDEX,
    PACKED_KEYS,
    Batch,
    is_packed,
    sample_count,
    sample_ids,
    sample_lengths,
    sum_per_sample,
)
from lt_posttrain.callbacks.hf_export import HFCheckpoint
from lt_posttrain.data.collate import StaticShape, collate_packed, collate_padded, pad_to_static
from lt_posttrain.data.datamodule import InstructDataModule
from lt_posttrain.data.dataset import (
    LONGER_THAN_MAX,
    NO_LOSS_TOKEN,
    SPLIT_BY_TEMPLATE,
    MicroBatchDataset,
    RowTokenizer,
    first_label,
    load_samples,
    tokenize_answer,
    tokenize_table,
)
from lt_posttrain.data.plan import MicroBatch
from lt_posttrain.data.source_types import SourceType, load_source_type
from lt_posttrain.data.sources import Source
from lt_posttrain.errors import UserError
from lt_posttrain.model.kernels import output_head
from lt_posttrain.model.loading import load_model
from lt_posttrain.trainers.sft import SFTModule
from lt_posttrain.training.losses import sequence_logps, token_cross_entropy_sum, token_logps
from lt_posttrain.training.sharding import FrozenModel
from lt_posttrain.training.tiled import run_as_forward, tiled_token_logps

__all__ = [
    # trainers
    "SFTModule",
    "FrozenModel",
    "load_model",
    # the batch contract
    "Batch",
    "IGNORE_INDEX",
    "PACKED_KEYS",
    "is_packed",
    "sample_count",
    "sample_ids",
    "sample_lengths",
    "sum_per_sample",
    # losses and log-probabilities
    "sequence_logps",
    "token_cross_entropy_sum",
    "token_logps",
    "tiled_token_logps",
    "output_head",
    "run_as_forward",
    # data: sources and source types
    "Source",
    "SourceType",
    "MessagesSourceType",
    "load_source_type",
    # data: modules, tokenizing, batching
    "InstructDataModule",
    "load_samples",
    "RowTokenizer",
    "tokenize_table",
    "tokenize_answer",
    "first_label",
    "SPLIT_BY_TEMPLATE",
    "NO_LOSS_TOKEN",
    "LONGER_THAN_MAX",
    "MicroBatch",
    "MicroBatchDataset",
    "collate_packed",
    "collate_padded",
    "StaticShape",
    "pad_to_static",
    # running, exporting, errors
    "run",
    "HFCheckpoint",
    "UserError",
]
__version__ = "0.1.0"
__api_version__ = "1.4"


def __getattr__(name: str):
    # A source type's module is imported only when asked for: a run imports the one type each source names.
    if name == "MessagesSourceType":
        from lt_posttrain.data.source_types.messages import MessagesSourceType

        return MessagesSourceType
    raise AttributeError(f"module 'lt_posttrain' has no attribute {name!r}")
