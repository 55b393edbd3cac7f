"""A callback for tests: keeps (and optionally saves) the gradients the optimizer is about to use."""

from typing import Optional

import lightning as L
import torch


class GradCapture(L.Callback):
    """Records ``{name: grad}`` before every optimizer step; rank 0 saves the first one to ``path`` if given."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self.grads: list[dict] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
        self.grads.append(grads)
        if self.path and trainer.is_global_zero and len(self.grads) == 1:
            torch.save(grads, self.path)
