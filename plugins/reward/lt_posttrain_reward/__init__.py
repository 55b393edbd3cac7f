"""Reward models for lt-posttrain: ``RewardModule`` (``model: reward``), ``RewardDataModule`` (``data: {class_path:
reward}``) and ``RewardPairsSourceType`` (``type: reward_pairs``)."""

from lt_posttrain_reward.datamodule import RewardBatchDataset, RewardDataModule
from lt_posttrain_reward.loss import bradley_terry_losses, last_token_positions
from lt_posttrain_reward.pairs import RewardPairsSourceType
from lt_posttrain_reward.tokenize import tokenize_reward_pairs
from lt_posttrain_reward.trainer import RewardModule

__all__ = ["RewardBatchDataset", "RewardDataModule", "RewardModule", "RewardPairsSourceType", "bradley_terry_losses",
           "last_token_positions", "tokenize_reward_pairs"]  # fmt: skip
