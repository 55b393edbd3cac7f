"""Direct Preference Optimization for lt-posttrain: ``DPOModule`` (``model: dpo``), ``PreferenceDataModule``
(``data: {class_path: preference}``) and ``PreferencePairsFormat`` (``type: preference_pairs``)."""

from lt_posttrain_dpo.datamodule import PreferenceDataModule
from lt_posttrain_dpo.loss import dpo_loss, pair_logps, sequence_logps
from lt_posttrain_dpo.pairs import Pair, PreferencePairsFormat
from lt_posttrain_dpo.trainer import DPOModule

__all__ = ["DPOModule", "Pair", "PreferenceDataModule", "PreferencePairsFormat", "dpo_loss", "pair_logps",
           "sequence_logps"]  # fmt: skip
