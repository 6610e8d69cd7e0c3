"""Rewards: the tiered recall reward for literature search (`literature.compute_score`) and the
batched, parallel reward manager (`manager.RewardManager`)."""

from deepretrieval.rewards.literature import RewardConfig, compute_score, recall_at_k, tier_reward
from deepretrieval.rewards.manager import RewardManager, compute_reward_metrics
from deepretrieval.rewards.parsing import check_format, parse_answer

__all__ = [
    "RewardConfig",
    "RewardManager",
    "check_format",
    "compute_reward_metrics",
    "compute_score",
    "parse_answer",
    "recall_at_k",
    "tier_reward",
]
