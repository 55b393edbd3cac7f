"""DPO's loss and the log-probabilities it compares, as plain functions of a batch of pairs."""

import torch
import torch.nn.functional as F

from lt_posttrain import Batch, sequence_logps, sum_per_sample


def pair_logps(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Each answer's log-probability (``lt_posttrain.sequence_logps``: the sum of ``log p(target)`` over its tokens)
    as ``[pairs, 2]``: a batch of pairs holds each pair's chosen answer, then its rejected one."""
    return sequence_logps(logits, batch).view(-1, 2)


def pair_sums(token_logps: torch.Tensor, batch: Batch) -> torch.Tensor:
    """:func:`pair_logps` from per-token log-probabilities (``lt_posttrain.tiled_token_logps``, 0 where no target,
    ``batch["targets"]``' shape) instead of logits: ``[pairs, 2]``."""
    return sum_per_sample(token_logps, batch).view(-1, 2)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss of each pair, ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``.

    Args:
        policy: ``[pairs, 2]`` log-probabilities of the chosen and the rejected answer under the trained model.
        reference: the same under the reference model.
        beta: how strongly the loss holds the policy near the reference.

    Returns:
        ``(losses [pairs], rewards [pairs, 2])``; the implicit rewards are ``beta * (policy - reference)``. The loss is
        ``log 2`` where policy and reference agree, and its gradient raises the chosen answer's log-probability and
        lowers the rejected one's.
    """
    rewards = beta * (policy - reference.to(policy.dtype))
    return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards
