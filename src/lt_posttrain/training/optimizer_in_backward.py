"""The optimizer step inside the backward pass: each weight is updated as soon as its gradient is complete and the
gradient freed at once, so the gradients of the whole model are never held together.

Two optimizers do it, both for bf16 weights without lost updates: torch-optimi's Kahan-compensated AdamW (its
gradient release; 8 bytes a trained weight: weight, two states, compensation) and torchao's stochastically rounding
AdamW (6 bytes: weight and two states, no compensation buffer).

What it cannot do follows from when it steps: no gradient clipping (the norm is known only after every weight has
moved), no gradient accumulation, and one device (data parallelism averages the gradients after the step).
"""

import functools

import optimi
import torch
from optimi.utils import HAS_TRITON

from lt_posttrain.errors import UserError
from lt_posttrain.training.strategy import SINGLE, distribution


class StepsInBackward:
    """The interface of an optimizer that steps in the backward pass, and its mechanism (a mixin before the optimizer
    class): a hook on each trained weight steps it (:meth:`_step_weight`) once its gradient is complete, then frees
    the gradient. Lightning's ``step`` only runs the closure (forward and backward).

    What others may use (the non-finite loss guard does, with ``isinstance``): ``skip_backward``, set True before a
    backward whose gradients must not reach the weights (each is freed without a step) and False after it.
    """

    steps_in_backward = True
    skip_backward = False

    def _hook_weights(self) -> None:
        self.skip_backward = False  # set for one backward (a non-finite loss, skipped): gradients dropped
        self._group_of = self._groups_by_weight()
        self.hooks = [weight.register_post_accumulate_grad_hook(self._step_one) for weight in self._group_of]

    def _groups_by_weight(self) -> dict:
        return {weight: group for group in self.param_groups for weight in group["params"]}

    def _step_one(self, weight: torch.Tensor) -> None:
        if not self.skip_backward:
            self._step_weight(weight, self._group_of[weight])  # a loaded state_dict brings new groups: see below
        weight.grad = None

    def _step_weight(self, weight: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def step(self, closure=None):
        """Lightning's step: the closure's backward already stepped every weight."""
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._group_of = self._groups_by_weight()


class AdamWInBackward(StepsInBackward, optimi.AdamW):
    """torch-optimi's Kahan-compensated AdamW over ``groups``, stepping each weight in the backward pass."""

    def __init__(self, groups: list[dict], learning_rate: float):
        trained = [p for group in groups for p in group["params"]]
        triton = all(p.is_cuda for p in trained) and HAS_TRITON
        super().__init__(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, kahan_sum=True, foreach=False,
                         triton=triton, gradient_release=True)  # fmt: skip
        for weight in trained:  # optimi links each weight's state to its group: linked only while it steps (below)
            self.state[weight].pop("group", None)
        self._hook_weights()

    def _step_weight(self, weight: torch.Tensor, group: dict) -> None:
        # optimi finds a weight's group in its state. Kept there, it would be copied with the state: Lightning moves
        # the state to the CPU at the end of a fit, which would then copy every weight of the group once for each.
        state = self.state[weight]
        state["group"] = group
        try:
            optimi.AdamW.step(self, param=weight)
        finally:
            del state["group"]


@functools.cache
def _stochastic_adamw_in_backward_class(torchao_adamw: type) -> type:
    class StochasticAdamWInBackward(StepsInBackward, torchao_adamw):
        """torchao's AdamW with bf16 stochastic rounding, stepping each weight in the backward pass."""

        def _step_weight(self, weight: torch.Tensor, group: dict) -> None:
            groups, self.param_groups = self.param_groups, [{**group, "params": [weight]}]  # torchao steps them all
            try:
                torchao_adamw.step(self)
            finally:
                self.param_groups = groups

    return StochasticAdamWInBackward


def stochastic_adamw_in_backward(torchao_adamw: type, groups: list[dict], learning_rate: float):
    """``torchao_adamw`` (torchao's AdamW class) with bf16 stochastic rounding over ``groups``, in the backward."""
    optimizer = _stochastic_adamw_in_backward_class(torchao_adamw)(
        groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, bf16_stochastic_round=True
    )
    optimizer._hook_weights()
    return optimizer


def check_optimizer_in_backward(trainer) -> None:
    """One line for what cannot run with the optimizer step in the backward pass."""
    what = "model.optimizer_in_backward"
    if trainer.accumulate_grad_batches > 1:
        raise UserError(f"{what} steps after every backward: set trainer.accumulate_grad_batches 1 (raise "
                        "data.batch_size instead)")  # fmt: skip
    if trainer.gradient_clip_val:
        raise UserError(f"{what} cannot clip gradients (each weight moves before the norm is known): unset "
                        "trainer.gradient_clip_val")  # fmt: skip
    if distribution(trainer.strategy).family != SINGLE:
        strategy = type(trainer.strategy).__name__
        raise UserError(f"{what} runs on one device (data parallelism and sharding average the gradients after the "
                        f"step would run), not with {strategy}: use trainer.devices 1")  # fmt: skip
