"""A single-process PPO / GRPO loop over the worker classes (cleanrl style: one readable function).

It runs the same functions the distributed trainer calls, in the same order::

    rollout.generate_sequences -> reward_fn -> actor.compute_log_prob (old) -> reference (KL)
    -> critic.compute_values -> [apply_kl_penalty] -> compute_advantage
    -> critic.update_critic -> actor.update_policy

and is used by the CPU learning tests and for quick experiments with tiny models.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch

from deepretrieval.protocol import Batch, to_object_array
from deepretrieval.trainer import ppo_core

logger = logging.getLogger(__name__)

RewardFn = Callable[[Batch], Any]


def _reward_tensor(result: Any, batch: Batch) -> torch.Tensor:
    """Token-level scores [B, R] from a reward function's result: a RewardManager-style dict
    (``reward_tensor``), a [B, R] tensor, or per-sample scores [B] (placed on the last valid token)."""
    if isinstance(result, dict):
        result = result["reward_tensor"]
    scores = torch.as_tensor(result, dtype=torch.float32)
    if scores.dim() == 1:
        return ppo_core.place_outcome_reward(scores, batch.batch["response_mask"])
    if scores.shape != batch.batch["responses"].shape:
        raise ValueError(f"reward tensor shape {tuple(scores.shape)} != responses {tuple(batch.batch['responses'].shape)}")
    return scores


def _prompt_stream(prompts: Union[Batch, Iterable[Batch], Callable[[int], Batch]]) -> Iterator[Batch]:
    step = 0
    if isinstance(prompts, Batch):
        while True:
            yield prompts
    elif callable(prompts):
        while True:
            yield prompts(step)
            step += 1
    else:
        while True:  # cycle through the iterable (epochs)
            empty = True
            for b in prompts:
                empty = False
                yield b
            if empty:
                raise ValueError("prompt iterable is empty")


def run_ppo_steps(
    actor: Any,
    rollout: Any,
    prompts: Union[Batch, Iterable[Batch], Callable[[int], Batch]],
    reward_fn: RewardFn,
    num_steps: int,
    adv_estimator: str = "gae",
    critic: Any = None,
    reference: Any = None,
    kl_ctrl: Any = None,
    kl_penalty: str = "kl",
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std_in_grpo: bool = True,
    critic_warmup: int = 0,
    on_step: Optional[Callable[[int, Dict[str, float]], Optional[bool]]] = None,
) -> List[Dict[str, float]]:
    """Run ``num_steps`` PPO iterations; returns one metrics dict per step.

    Args:
        actor / rollout / critic / reference: :class:`~deepretrieval.workers.actor.Actor`,
            a rollout (``generate_sequences``), :class:`~deepretrieval.workers.critic.Critic` (required for
            ``adv_estimator="gae"``), :class:`~deepretrieval.workers.reference.Reference` (needed when
            ``kl_ctrl`` is given or the actor has ``use_kl_loss``).
        prompts: one prompt Batch (reused every step), an iterable of Batches (cycled), or ``step -> Batch``.
        reward_fn: ``Batch -> scores [B] | token scores [B, R] | {"reward_tensor": ...}``.
        kl_ctrl: a KL controller (``core_algos.get_kl_controller``): subtract ``beta * KL`` from the rewards.
        on_step: ``(step, metrics) -> stop?`` called after each step; returning True ends the loop early.
    """
    if adv_estimator == "gae" and critic is None:
        raise ValueError("adv_estimator='gae' needs a critic")
    if kl_ctrl is not None and reference is None:
        raise ValueError("a KL penalty in the reward needs a reference")
    history: List[Dict[str, float]] = []
    stream = _prompt_stream(prompts)
    for step in range(num_steps):
        timings: Dict[str, float] = {}
        metrics: Dict[str, float] = {}
        batch = next(stream)
        if "uid" not in batch.non_tensor_batch:  # GRPO groups: one id per prompt, shared by its n samples
            batch = Batch(batch.batch, dict(batch.non_tensor_batch), dict(batch.meta_info))
            batch.non_tensor_batch["uid"] = to_object_array(str(uuid.uuid4()) for _ in range(len(batch)))

        with ppo_core.marked_timer("gen", timings):
            batch = rollout.generate_sequences(batch)
        with ppo_core.marked_timer("reward", timings):
            batch.batch["token_level_scores"] = _reward_tensor(reward_fn(batch), batch)
        with ppo_core.marked_timer("old_log_prob", timings):
            old_log_probs, entropy = actor.compute_log_prob(batch, calculate_entropy=True)
            batch.batch["old_log_probs"] = old_log_probs
            metrics["actor/entropy_rollout"] = float((entropy * batch.batch["response_mask"]).sum()
                                                     / batch.batch["response_mask"].sum().clamp(min=1))
        if reference is not None:
            with ppo_core.marked_timer("ref", timings):
                batch.batch["ref_log_prob"] = reference.compute_ref_log_prob(batch)
        if critic is not None:
            with ppo_core.marked_timer("values", timings):
                batch.batch["values"] = critic.compute_values(batch)
        with ppo_core.marked_timer("adv", timings):
            if kl_ctrl is not None:
                batch, kl_metrics = ppo_core.apply_kl_penalty(batch, kl_ctrl, kl_penalty)
                metrics.update(kl_metrics)
            else:
                batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
            batch = ppo_core.compute_advantage(batch, adv_estimator, gamma=gamma, lam=lam,
                                               norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo)
        if critic is not None:
            with ppo_core.marked_timer("update_critic", timings):
                metrics.update(critic.update_critic(batch))
        if step >= critic_warmup:
            with ppo_core.marked_timer("update_actor", timings):
                metrics.update(actor.update_policy(batch))
        metrics.update(ppo_core.compute_data_metrics(batch, use_critic=critic is not None))
        metrics.update({f"timing_s/{k}": v for k, v in timings.items()})
        metrics["step"] = float(step)
        history.append(metrics)
        logger.info("step %d score %.3f", step, metrics.get("critic/score/mean", float("nan")))
        if on_step is not None and on_step(step, metrics):
            break
    return history
