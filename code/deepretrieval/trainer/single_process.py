"""The in-process worker set: model objects built in memory behind the worker groups' methods, so
the production step :func:`~deepretrieval.trainer.step.ppo_step` drives them as it drives the Ray
worker groups (cleanrl style: a tiny model, a reward function and a loop of a few lines).

    InProcessActor(actor, rollout, reference)   generate_sequences, compute_log_prob,
                                                compute_ref_log_prob, update_actor
    InProcessCritic(critic)                     compute_values, update_critic

:func:`run_ppo_steps` runs ``ppo_step`` over them for a number of steps; the CPU learning tests
and quick experiments with tiny models use it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf

from deepretrieval.algorithms import core_algos
from deepretrieval.protocol import Batch
from deepretrieval.trainer.step import place_outcome_reward, ppo_step
from deepretrieval.workers.rollout.base import resolve_sampling

logger = logging.getLogger(__name__)

RewardFn = Callable[[Batch], Any]


class InProcessActor:
    """The actor / rollout / reference worker's methods over an
    :class:`~deepretrieval.workers.actor.Actor`, a rollout (``generate_sequences``) and an optional
    :class:`~deepretrieval.workers.reference.Reference`, all in this process."""

    def __init__(self, actor: Any, rollout: Any, reference: Any = None):
        self.actor, self.rollout, self.reference = actor, rollout, reference

    def generate_sequences(self, prompts: Batch) -> Batch:
        return self.rollout.generate_sequences(prompts)

    def compute_log_prob(self, batch: Batch) -> Batch:
        """``old_log_probs`` [B, R] and ``entropys`` [B, R] of the responses."""
        log_probs, entropy = self.actor.compute_log_prob(batch, calculate_entropy=True)
        return Batch.from_dict({"old_log_probs": log_probs, "entropys": entropy})

    def compute_ref_log_prob(self, batch: Batch) -> Batch:
        if self.reference is None:
            raise RuntimeError("this worker set has no reference")
        return Batch.from_dict({"ref_log_prob": self.reference.compute_ref_log_prob(batch)})

    def update_actor(self, batch: Batch) -> Dict[str, float]:
        return self.actor.update_policy(batch)


class InProcessCritic:
    """The critic worker's methods over a :class:`~deepretrieval.workers.critic.Critic`."""

    def __init__(self, critic: Any):
        self.critic = critic

    def compute_values(self, batch: Batch) -> Batch:
        return Batch.from_dict({"values": self.critic.compute_values(batch)})

    def update_critic(self, batch: Batch) -> Dict[str, float]:
        return self.critic.update_critic(batch)


def _reward_tensor(result: Any, batch: Batch) -> torch.Tensor:
    """Token-level scores [B, R] from a reward function's result: a RewardManager-style dict
    (``reward_tensor``), a [B, R] tensor, or per-sample scores [B] (placed on the last valid token)."""
    if isinstance(result, dict):
        result = result["reward_tensor"]
    scores = torch.as_tensor(result, dtype=torch.float32)
    if scores.dim() == 1:
        return place_outcome_reward(scores, batch.batch["response_mask"])
    if scores.shape != batch.batch["responses"].shape:
        raise ValueError(f"reward tensor shape {tuple(scores.shape)} != responses {tuple(batch.batch['responses'].shape)}")
    return scores


def as_reward_manager(reward_fn: RewardFn) -> Callable[..., Dict[str, Any]]:
    """``reward_fn`` (``Batch -> scores [B] | token scores [B, R] | {"reward_tensor": ..}``) with the
    RewardManager's interface that ``ppo_step`` calls; a dict result keeps its ``metrics`` and
    ``reward_extra_info`` (e.g. ``search_unavailable``)."""

    def manager(batch: Batch, return_dict: bool = True) -> Dict[str, Any]:
        result = reward_fn(batch)
        out = {"reward_tensor": _reward_tensor(result, batch)}
        if isinstance(result, dict):
            out.update({k: result[k] for k in ("metrics", "reward_extra_info") if k in result})
        return out

    return manager


def step_config(n: int, adv_estimator: str, use_kl_in_reward: bool, kl_penalty: str, use_kl_loss: bool,
                gamma: float, lam: float, norm_adv_by_std_in_grpo: bool, critic_warmup: int, seed: int,
                recompute_old_log_prob: bool) -> DictConfig:
    """The trainer-config keys ``ppo_step`` reads, for one in-process worker set (one worker, no
    batch balancing); the reference runs when ``use_kl_in_reward`` or ``use_kl_loss``;
    ``recompute_old_log_prob`` is the actor's own setting (``ActorConfig``)."""
    return OmegaConf.create({
        "algorithm": {"adv_estimator": adv_estimator, "gamma": gamma, "lam": lam,
                      "norm_adv_by_std_in_grpo": norm_adv_by_std_in_grpo,
                      "use_kl_in_reward": use_kl_in_reward, "kl_penalty": kl_penalty},
        "actor_rollout_ref": {"actor": {"use_kl_loss": use_kl_loss, "recompute_old_log_prob": recompute_old_log_prob},
                              "rollout": {"n": n}},
        "trainer": {"seed": seed, "balance_batch": False, "critic_warmup": critic_warmup,
                    "n_gpus_per_node": 1, "nnodes": 1},
    })


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
    seed: int = 1,
    on_step: Optional[Callable[[int, Dict[str, float]], Optional[bool]]] = None,
) -> List[Dict[str, float]]:
    """Run ``num_steps`` iterations of :func:`~deepretrieval.trainer.step.ppo_step`; returns one
    metrics dict per step (with ``step``, 0-based).

    Args:
        actor / rollout / critic / reference: :class:`~deepretrieval.workers.actor.Actor`,
            a rollout (``generate_sequences``), :class:`~deepretrieval.workers.critic.Critic` (required for
            ``adv_estimator="gae"``), :class:`~deepretrieval.workers.reference.Reference` (needed when
            ``kl_ctrl`` is given or the actor has ``use_kl_loss``).
        prompts: one prompt Batch (reused every step), an iterable of Batches (cycled), or ``step -> Batch``.
            Each prompt gets the uid ``s{step}_{i}`` (a uid the batch carries is replaced, as in
            production): the groups of GRPO / RLOO are the n samples of one prompt.
        reward_fn: ``Batch -> scores [B] | token scores [B, R] | {"reward_tensor": ...}``
            (:func:`as_reward_manager`).
        kl_ctrl: a KL controller (``core_algos.get_kl_controller``): subtract ``beta * KL`` from the rewards.
        seed: ``trainer.seed``: the rollout samples step s with the seed ``seed * 1_000_003 + s``.
        on_step: ``(step, metrics) -> stop?`` called after each step; returning True ends the loop early.
    """
    if "values" in core_algos.adv_estimator_inputs(adv_estimator) and critic is None:
        raise ValueError(f"adv_estimator={adv_estimator!r} needs a critic")
    if kl_ctrl is not None and reference is None:
        raise ValueError("a KL penalty in the reward needs a reference")
    # with a reference, its log-probs go to the actor update (the actor's own use_kl_loss decides)
    config = step_config(resolve_sampling(rollout.config, {}).n, adv_estimator, kl_ctrl is not None, kl_penalty,
                         reference is not None, gamma, lam, norm_adv_by_std_in_grpo, critic_warmup, seed,
                         actor.config.recompute_old_log_prob)
    workers = InProcessActor(actor, rollout, reference)
    critic_workers = InProcessCritic(critic) if critic is not None else None
    manager = as_reward_manager(reward_fn)
    history: List[Dict[str, float]] = []
    stream = _prompt_stream(prompts)
    for step in range(num_steps):
        prompt_batch = next(stream)  # a copy: ppo_step sets the uids and the seed of its batch
        batch = Batch(prompt_batch.batch, dict(prompt_batch.non_tensor_batch), dict(prompt_batch.meta_info))
        metrics = ppo_step(batch, step, workers, critic_workers, manager, config, kl_ctrl)
        metrics["step"] = float(step)
        history.append(metrics)
        logger.info("step %d score %.3f", step, metrics.get("critic/score/mean", float("nan")))
        if on_step is not None and on_step(step, metrics):
            break
    return history
