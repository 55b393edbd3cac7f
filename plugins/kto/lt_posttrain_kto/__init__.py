"""Kahneman-Tversky Optimization for lt-posttrain: ``KTOModule`` (``model: kto``), ``UnpairedPreferenceDataModule``
(``data: {class_path: unpaired_preference}``) and ``LabelledCompletionsSourceType`` (``type:
labelled_completions``)."""

from lt_posttrain_kto.completions import LabelledCompletion, LabelledCompletionsSourceType
from lt_posttrain_kto.datamodule import LabelledBatchDataset, UnpairedPreferenceDataModule, mismatched_partners
from lt_posttrain_kto.loss import kl_estimate, kto_losses
from lt_posttrain_kto.tokenize import tokenize_labelled
from lt_posttrain_kto.trainer import KTOModule

__all__ = ["KTOModule", "LabelledBatchDataset", "LabelledCompletion", "LabelledCompletionsSourceType",
           "UnpairedPreferenceDataModule", "kl_estimate", "kto_losses", "mismatched_partners",
           "tokenize_labelled"]  # fmt: skip
