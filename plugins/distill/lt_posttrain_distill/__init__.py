"""Knowledge distillation for lt-posttrain: ``DistillModule`` (``model: distill``), a student trained on a frozen
teacher's next-token distributions at the loss tokens of any chat data."""

from lt_posttrain_distill.losses import Divergence, tiled_divergence_sum, token_divergences
from lt_posttrain_distill.trainer import DistillModule

__all__ = ["DistillModule", "Divergence", "tiled_divergence_sum", "token_divergences"]
