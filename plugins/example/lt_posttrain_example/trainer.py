"""``--model label_smoothing``: supervised fine-tuning with label smoothing, a trainer that overrides ``loss`` only."""

import torch
import torch.nn.functional as F

from lt_posttrain import IGNORE_INDEX, Batch, SFTModule


class LabelSmoothingSFT(SFTModule):
    """Cross-entropy against targets smoothed toward the uniform distribution over the vocabulary.

    Args:
        smoothing: the probability mass moved from the target token to all tokens evenly (0: plain SFT).
        *args, **kwargs: :class:`~lt_posttrain.SFTModule`'s (``name_or_path``, ``learning_rate``, ...).
    """

    def __init__(self, *args, smoothing: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.smoothing = smoothing

    def loss(self, batch: Batch) -> torch.Tensor:
        """The *sum* of the micro-batch's token losses (the framework divides by the step's loss-token count)."""
        logits = self(batch)  # [batch, sequence, vocab], padded or packed alike
        losses = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE_INDEX,
                                 label_smoothing=self.smoothing, reduction="none")  # fmt: skip
        if "target_weights" in batch:  # samples with a weight scale their tokens' losses
            losses = losses * batch["target_weights"].flatten()
        return losses.sum()
