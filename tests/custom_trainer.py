"""A custom trainer as a user writes one (the README's example): a subclass that overrides ``loss`` only."""

import torch
import torch.nn.functional as F

from lt_posttrain import SFTModule


class LabelSmoothingSFT(SFTModule):
    def __init__(self, *args, smoothing: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.smoothing = smoothing

    def loss(self, batch: dict) -> torch.Tensor:
        logits = self(batch)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                               ignore_index=-100, label_smoothing=self.smoothing, reduction="sum")  # fmt: skip
