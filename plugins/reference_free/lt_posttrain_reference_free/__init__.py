"""Preference optimisation without a reference model for lt-posttrain: ``ORPOModule`` (``model: orpo``) and
``SimPOModule`` (``model: simpo``), on the DPO plugin's preference pairs (``data: {class_path: preference}``)."""

from lt_posttrain_reference_free.losses import orpo_losses, simpo_losses
from lt_posttrain_reference_free.trainer import ORPOModule, PairScores, ReferenceFreePreferenceModule, SimPOModule

__all__ = ["ORPOModule", "PairScores", "ReferenceFreePreferenceModule", "SimPOModule", "orpo_losses", "simpo_losses"]
