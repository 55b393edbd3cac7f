"""A trainer for tests: the loss of chosen optimizer steps is NaN, as after a numerical blow-up."""

from typing import Optional

import torch

from lt_posttrain import SFTModule


class NaNLossAtSteps(SFTModule):
    """``SFTModule`` whose loss is NaN on the optimizer steps listed (counted from 1).

    Args:
        nan_at_steps: the optimizer steps whose micro-batches all get a NaN loss.
    """

    def __init__(self, *args, nan_at_steps: Optional[list[int]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_at_steps = set(nan_at_steps or ())

    def loss(self, batch: dict) -> torch.Tensor:
        loss = super().loss(batch)
        return loss * float("nan") if self.trainer.global_step + 1 in self.nan_at_steps else loss
