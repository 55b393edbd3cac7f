"""Direct Preference Optimization for lt-posttrain: ``DPOModule`` (``model: dpo``), ``PreferenceDataModule``
(``data: {class_path: preference}``) and ``PreferencePairsSourceType`` (``type: preference_pairs``)."""

from lt_posttrain_dpo.datamodule import PreferenceDataModule
from lt_posttrain_dpo.loss import dpo_loss, pair_logps, pair_sums, sequence_logps
from lt_posttrain_dpo.pairs import Pair, PreferencePairsSourceType
from lt_posttrain_dpo.trainer import DPOModule

__all__ = ["DPOModule", "Pair", "PreferenceDataModule", "PreferencePairsSourceType", "dpo_loss", "pair_logps",
           "pair_sums", "sequence_logps"]  # fmt: skip
