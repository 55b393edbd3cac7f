"""The reward model's loss and where it reads each conversation's reward, as plain functions."""

from typing import Optional

import torch
import torch.nn.functional as F

from lt_posttrain import Batch, sample_count, sample_ids


def bradley_terry_losses(rewards: torch.Tensor, margin: Optional[torch.Tensor] = None,
                         center_rewards_coefficient: Optional[float] = None) -> torch.Tensor:  # fmt: skip
    """The Bradley-Terry loss of each pair, ``-log sigmoid(r_chosen - r_rejected - margin)``, plus
    ``center_rewards_coefficient * (r_chosen + r_rejected) ** 2`` when set (Eisenstein et al., 2023: keeps the rewards
    centred on 0), as TRL 1.16's ``RewardTrainer.compute_loss`` computes them.

    Args:
        rewards: ``[pairs, 2]`` each pair's chosen and rejected reward.
        margin: ``[pairs]`` how much the chosen reward should exceed the rejected one (None: 0).
        center_rewards_coefficient: the weight of the centring term (None: none).

    Returns:
        ``[pairs]``.
    """
    rewards = rewards.float()
    difference = rewards[:, 0] - rewards[:, 1]
    if margin is not None:
        difference = difference - margin.to(rewards)
    losses = -F.logsigmoid(difference)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * rewards.sum(-1) ** 2
    return losses


def last_token_positions(batch: Batch, pad_id: Optional[int]) -> torch.Tensor:
    """``[samples]``: where each sample's reward is read, as positions in ``batch["input_ids"]`` flattened: its last
    token that is not ``pad_id``, as Hugging Face's ``...ForSequenceClassification`` reads a padded row (so the
    exported model scores a conversation as training did), padded or packed; padding samples left out."""
    input_ids = batch["input_ids"].reshape(-1)
    positions = torch.arange(len(input_ids), device=input_ids.device)
    real = positions if pad_id is None else torch.where(input_ids != pad_id, positions, -1)
    samples = sample_ids(batch).reshape(-1)
    last = torch.full((int(samples.max()) + 1,), -1, device=input_ids.device, dtype=positions.dtype)
    last = last.scatter_reduce(0, samples, real, reduce="amax")[: sample_count(batch)]
    # a sample of pad tokens only (no chat template makes one) is read at its last position
    ends = torch.zeros_like(last).scatter_reduce(0, samples, positions, reduce="amax")[: len(last)]
    return torch.where(last >= 0, last, ends)
