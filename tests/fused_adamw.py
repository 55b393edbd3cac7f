"""torch's fused AdamW (CPU kernels since torch 2.4) that records the gradient norm it steps with."""

import torch


class FusedAdamW(torch.optim.AdamW):
    norms_at_step: list[float] = []

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr, fused=True)

    def step(self, closure=None):
        loss = closure() if closure is not None else None  # Lightning clips inside its closure
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        FusedAdamW.norms_at_step.append(float(torch.nn.utils.get_total_norm(grads)))
        super().step()
        return loss
