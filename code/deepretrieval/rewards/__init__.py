"""Rewards: the tiered recall reward for literature search (`literature.compute_score`) and the
batched, parallel reward manager (`manager.RewardManager`).

The names below are imported from their modules on first use (PEP 562 `__getattr__`): the prompt
templates (deepretrieval.data.prompts) write their answer examples with `parsing.format_answer`,
and importing them must not pull in the reward's engines and numpy (every `deepretrieval` command
builds its parser from them).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "RewardConfig": "literature", "compute_score": "literature",
    "tier_reward": "literature",
    "RewardManager": "manager", "compute_reward_metrics": "manager",
    "check_format": "parsing", "format_answer": "parsing", "parse_answer": "parsing",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
