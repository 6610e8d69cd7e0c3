"""Train/inference mismatch: how far the rollout engine's log-probabilities of the sampled tokens are
from the actor's own (``old_log_probs``, recomputed under the training numerics).

With synced weights the gap is numerical only (float32 on CPU: ~1e-5; bf16 engines: ~1e-2); a stale
engine (weights not synced) opens a gap of the size of the update. Logged every step when the rollout
returns ``rollout_log_probs`` (the vLLM rollout does):

- ``training/rollout_log_probs_diff_mean`` / ``_max``: mean and max of ``|log p_rollout - log p_actor|``
  over the response tokens (the issue's definition);
- ``training/rollout_probs_diff_mean`` / ``_max`` / ``_std``: verl's metric of the same name, on
  probabilities ``|p_rollout - p_actor|``.
"""

from __future__ import annotations

from typing import Dict

import torch

from deepretrieval.protocol import Batch


def rollout_mismatch_metrics(rollout_log_probs: torch.Tensor, actor_log_probs: torch.Tensor,
                             response_mask: torch.Tensor) -> Dict[str, float]:
    """The metrics in the module docstring over the tokens where ``response_mask`` is 1 (``[B, R]`` each);
    empty when there are no such tokens."""
    mask = response_mask.bool()
    if not bool(mask.any()):
        return {}
    rollout = rollout_log_probs.float()[mask]
    actor = actor_log_probs.float()[mask]
    log_diff = (rollout - actor).abs()
    prob_diff = (rollout.exp() - actor.exp()).abs()
    return {
        "training/rollout_log_probs_diff_mean": float(log_diff.mean()),
        "training/rollout_log_probs_diff_max": float(log_diff.max()),
        "training/rollout_probs_diff_mean": float(prob_diff.mean()),
        "training/rollout_probs_diff_max": float(prob_diff.max()),
        "training/rollout_probs_diff_std": float(prob_diff.std()) if prob_diff.numel() > 1 else 0.0,
    }


def batch_mismatch_metrics(batch: Batch) -> Dict[str, float]:
    """:func:`rollout_mismatch_metrics` of a batch holding ``rollout_log_probs`` (from the rollout) and
    ``old_log_probs`` (from the actor); empty when either is missing (e.g. the HF rollout, which samples
    with the actor's own module and returns no separate log-probs)."""
    keys = batch.tensor_keys
    if "rollout_log_probs" not in keys or "old_log_probs" not in keys:
        return {}
    return rollout_mismatch_metrics(batch.batch["rollout_log_probs"], batch.batch["old_log_probs"],
                                    batch.batch["response_mask"])
