"""The optimizer step inside the backward pass: each weight is updated as soon as its gradient is complete and the
gradient freed at once, so the gradients of the whole model are never held together (torch-optimi's gradient
release). With bf16 weights and Kahan-compensated AdamW that is 8 bytes a trained weight in all (weight, two
states, compensation), what plain bf16 AdamW needs with its gradients, and no update is lost.

What it cannot do follows from when it steps: no gradient clipping (the norm is known only after every weight has
moved), no gradient accumulation, and one device (data parallelism averages the gradients after the step).
"""

import optimi
import torch
from optimi.utils import HAS_TRITON

from lt_posttrain.errors import UserError


class AdamWInBackward(optimi.AdamW):
    """torch-optimi's Kahan-compensated AdamW over ``groups``, stepping each weight in the backward pass."""

    steps_in_backward = True

    def __init__(self, groups: list[dict], learning_rate: float):
        trained = [p for group in groups for p in group["params"]]
        triton = all(p.is_cuda for p in trained) and HAS_TRITON
        super().__init__(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, kahan_sum=True, foreach=False,
                         triton=triton, gradient_release=True)  # fmt: skip
        self.skip_backward = False  # set for one backward (a non-finite loss, skipped): gradients dropped
        self._group_of = self._groups_by_weight()
        for param in trained:  # optimi links each weight's state to its group: linked only while it steps (below)
            self.state[param].pop("group", None)
        self.hooks = [p.register_post_accumulate_grad_hook(self._step_one) for p in trained]

    def _step_one(self, param: torch.Tensor) -> None:
        if not self.skip_backward:
            # optimi finds a weight's group in its state. Kept there, it would be copied with the state: Lightning
            # moves the state to the CPU at the end of a fit, which would then copy every weight of the group once
            # for each weight, and a loaded state_dict brings new groups (the schedule's learning rate missed).
            state = self.state[param]
            state["group"] = self._group_of[param]
            try:
                super().step(param=param)
            finally:
                del state["group"]
        param.grad = None

    def _groups_by_weight(self) -> dict:
        return {param: group for group in self.param_groups for param in group["params"]}

    def step(self, closure=None, param=None):
        """Lightning's step: the closure's backward already stepped every weight."""
        if param is not None:
            return super().step(param=param)
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._group_of = self._groups_by_weight()


def check_optimizer_in_backward(trainer) -> None:
    """One line for what cannot run with the optimizer step in the backward pass."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    what = "model.optimizer_in_backward"
    if trainer.accumulate_grad_batches > 1:
        raise UserError(f"{what} steps after every backward: set trainer.accumulate_grad_batches 1 (raise "
                        "data.batch_size instead)")  # fmt: skip
    if trainer.gradient_clip_val:
        raise UserError(f"{what} cannot clip gradients (each weight moves before the norm is known): unset "
                        "trainer.gradient_clip_val")  # fmt: skip
    if not isinstance(trainer.strategy, SingleDeviceStrategy):
        strategy = type(trainer.strategy).__name__
        raise UserError(f"{what} runs on one device (data parallelism and sharding average the gradients after the "
                        f"step would run), not with {strategy}: use trainer.devices 1")  # fmt: skip
