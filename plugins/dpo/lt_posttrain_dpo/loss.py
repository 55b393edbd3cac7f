"""DPO's loss and the log-probabilities it compares, as plain functions of logits and a batch of pairs."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the target of positions without loss


def sequence_logps(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The log-probability of each sequence's answer: the sum over its positions with a target of
    ``log p(target)``, in float32.

    Args:
        logits: ``[sequences, length, vocab]`` (padded) or ``[1, tokens, vocab]`` (packed).
        batch: its ``targets`` (``-100`` where no loss) and, when packed, ``cu_seq_lens_q`` (sequence boundaries).

    Returns:
        ``[sequences]``.
    """
    targets = batch["targets"]
    # 0 at positions without a target
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none")  # fmt: skip
    if "cu_seq_lens_q" not in batch:
        return token_logps.view(targets.shape).sum(-1)
    bounds = batch["cu_seq_lens_q"].long()
    sequence_of_token = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=bounds.device), bounds.diff())
    return token_logps.new_zeros(len(bounds) - 1).index_add(0, sequence_of_token.to(token_logps.device), token_logps)


def pair_logps(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """:func:`sequence_logps` as ``[pairs, 2]``: a batch of pairs holds each pair's chosen answer, then its rejected
    one."""
    return sequence_logps(logits, batch).view(-1, 2)


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
