"""One PPO / GRPO step, the same for the Ray trainer and the in-process mode (verl's order).

    generate (n samples per prompt) -> reward (search + recall) -> old log-probs -> reference
    log-probs -> values -> KL penalty + advantages (here, pure functions) -> critic update ->
    actor update -> the rollout engine sees the new weights (HF rollout shares the actor's module)

:func:`ppo_step` reads top to bottom like cleanrl's loop. It drives two objects with the worker
groups' methods: ``actor`` (``generate_sequences``, ``compute_log_prob``, ``compute_ref_log_prob``,
``update_actor``) and ``critic`` (``compute_values``, ``update_critic``; None without one). The Ray
and in-process worker groups of :class:`~deepretrieval.trainer.ppo_trainer.PPOTrainer` and the
in-memory workers of :mod:`deepretrieval.trainer.single_process` all expose them.

Samples whose search was unavailable (`search_unavailable`, the service's fault, not the model's)
are left out of the update: advantages are computed without them and their response mask is
zeroed, so they add nothing to any loss while the batch keeps the shape the batch arithmetic
promised every worker. A step whose every sample is left out updates nothing (`train/step_skipped`).

The driver-side Batch functions glue the pure tensor functions of
:mod:`deepretrieval.algorithms.core_algos` to the Batch keys of the step (verl names):

    token_level_scores --apply_kl_penalty--> token_level_rewards --compute_advantage--> advantages, returns
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any, Callable, Dict

import numpy as np
import torch

from deepretrieval.algorithms import core_algos
from deepretrieval.algorithms.utils import masked_mean
from deepretrieval.protocol import Batch
from deepretrieval.trainer.config import uses_reference, world_size
from deepretrieval.trainer.metrics import (
    compute_data_metrics,
    compute_response_mask,
    compute_throughput_metrics,
    compute_timing_metrics,
    marked_timer,
)
from deepretrieval.workers.rollout.mismatch import batch_mismatch_metrics

logger = logging.getLogger(__name__)

# batch keys each worker call needs (only these travel to the workers)
LOG_PROB_KEYS = ["responses", "input_ids", "attention_mask", "position_ids"]
ACTOR_UPDATE_KEYS = LOG_PROB_KEYS + ["response_mask", "old_log_probs", "advantages"]
CRITIC_UPDATE_KEYS = LOG_PROB_KEYS + ["response_mask", "values", "returns"]


def ppo_step(batch: Batch, step: int, actor: Any, critic: Any, reward_fn: Callable[..., Dict[str, Any]],
             config: Any, kl_ctrl: Any) -> Dict[str, float]:
    """One iteration on the prompts of ``batch``; returns the step's metrics.

    Args:
        batch: the prompts (changed in place: their ``uid`` and the sampling seed are set).
        step: the number of steps done before this one (0 for the first): it names the uids and
            seeds the rollout (``trainer.seed * 1_000_003 + step``); the actor is updated from
            step ``trainer.critic_warmup`` on.
        actor, critic: the worker groups (see the module docstring); ``critic`` None without one.
        reward_fn: ``reward_fn(batch, return_dict=True) -> {"reward_tensor": [B, R], "metrics": {..},
            "reward_extra_info": {"search_unavailable": [B], ..}}`` (the RewardManager's interface).
        config: the trainer config (``algorithm``, ``trainer``, ``actor_rollout_ref`` sections).
        kl_ctrl: the KL controller of the reward penalty (used with ``algorithm.use_kl_in_reward``).
    """
    cfg = config
    metrics: Dict[str, float] = {}
    timings: Dict[str, float] = {}
    n = int(cfg.actor_rollout_ref.rollout.n)
    n_workers = world_size(cfg)
    with marked_timer("step", timings):
        # 1. rollout: n samples per prompt; the samples of a prompt share its uid (GRPO's groups)
        batch.non_tensor_batch["uid"] = np.array([f"s{step}_{i}" for i in range(len(batch))], dtype=object)
        batch.meta_info.update({"seed": int(cfg.trainer.seed) * 1_000_003 + step, "validate": False})
        with marked_timer("gen", timings):
            batch = actor.generate_sequences(batch)
        batch.meta_info.pop("timing_gen_worker_s", None)
        if cfg.trainer.balance_batch and n_workers > 1:
            metrics.update(balance_batch(batch, n_workers))
        batch.meta_info["global_token_num"] = batch.batch["attention_mask"].sum(-1).tolist()

        # 2. reward: parse, search, recall; samples without a search answer are left out below
        with marked_timer("reward", timings):
            reward = reward_fn(batch, return_dict=True)
        batch.batch["token_level_scores"] = reward["reward_tensor"].to(torch.float32)
        metrics.update(reward.get("metrics", {}))
        flags = reward.get("reward_extra_info", {}).get("search_unavailable") or [False] * len(batch)
        unavailable = torch.tensor([bool(f) for f in flags], dtype=torch.bool)
        metrics["train/search_unavailable_samples"] = float(unavailable.sum())

        # 3. log-probs of the samples under the policy (and its entropy), the reference; values
        # the sampling temperature the log-probs are scaled by (1.0 when the rollout did not say)
        meta = {"temperature": batch.meta_info.setdefault("temperature", 1.0)}
        # (skipped with actor.recompute_old_log_prob=false: the update reads its own log-probs, detached)
        recompute = bool(cfg.actor_rollout_ref.actor.recompute_old_log_prob)  # default: config/ppo_trainer.yaml
        if recompute:
            with marked_timer("old_log_prob", timings):
                lp = actor.compute_log_prob(batch.select(batch_keys=LOG_PROB_KEYS, meta_info_keys=list(meta)))
            batch = batch.union(lp)
            metrics.update(batch_mismatch_metrics(batch))  # vLLM rollout: engine vs actor log-probs
        if "entropys" in batch.tensor_keys:
            ent = batch.batch["entropys"]
            mask = batch.batch["response_mask"].float()
            metrics["actor/entropy_rollout"] = float((ent * mask).sum() / mask.sum().clamp(min=1))
        if uses_reference(cfg):
            with marked_timer("ref", timings):
                ref = actor.compute_ref_log_prob(batch.select(batch_keys=LOG_PROB_KEYS, meta_info_keys=list(meta)))
            batch = batch.union(ref)
        if critic is not None:
            with marked_timer("values", timings):
                values = critic.compute_values(batch.select(batch_keys=LOG_PROB_KEYS + ["response_mask"]))
            batch = batch.union(values)

        # 4. rewards (scores minus the KL penalty) and advantages, on the driver
        with marked_timer("adv", timings):
            if cfg.algorithm.use_kl_in_reward:
                batch, kl_metrics = apply_kl_penalty(batch, kl_ctrl, kl_penalty=cfg.algorithm.kl_penalty)
                metrics.update(kl_metrics)
            else:
                batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
            batch = compute_advantage_leaving_out(batch, unavailable, cfg.algorithm)

        # 5. updates: the critic, then the actor (after critic_warmup steps); none without a search answer
        trainable = bool((~unavailable).any())
        metrics["train/step_skipped"] = 0.0 if trainable else 1.0
        if not trainable:
            logger.warning("step %d: every search was unavailable; no update this step (skipped)", step + 1)
        if critic is not None and trainable:
            with marked_timer("update_critic", timings):
                metrics.update(critic.update_critic(batch.select(batch_keys=CRITIC_UPDATE_KEYS)))
        if trainable and step >= int(cfg.trainer.critic_warmup):
            keys = ACTOR_UPDATE_KEYS + (["ref_log_prob"] if cfg.actor_rollout_ref.actor.use_kl_loss else [])
            if not recompute:
                keys = [k for k in keys if k != "old_log_probs"]
            with marked_timer("update_actor", timings):
                metrics.update(actor.update_actor(batch.select(batch_keys=keys, meta_info_keys=list(meta))))
    metrics.update(compute_data_metrics(batch, use_critic=critic is not None))
    metrics.update(compute_timing_metrics(batch, timings))
    metrics.update(compute_throughput_metrics(batch, timings, n_gpus=n_workers))
    metrics["train/rollout_n"] = float(n)
    return metrics


def balance_batch(batch: Batch, n_workers: int) -> Dict[str, float]:
    """Reorder `batch` in place so each of the `n_workers` data-parallel workers' contiguous share
    holds about the same number of valid tokens (verl's `_balance_batch`); uids travel with their
    samples, so group-based advantages are unaffected. Returns the largest share over the mean
    share, before (`train/dp_token_imbalance_before`) and after (`train/dp_token_imbalance`)."""
    from deepretrieval.workers.seqbalance import dp_balanced_order

    lens = batch.batch["attention_mask"].sum(-1)

    def spread(x: torch.Tensor) -> float:
        loads = x.view(n_workers, -1).sum(-1).float()
        return float(loads.max() / loads.mean().clamp(min=1))

    before = spread(lens)
    order = dp_balanced_order(lens.tolist(), n_workers)
    batch.reorder(order)
    return {"train/dp_token_imbalance_before": before,
            "train/dp_token_imbalance": spread(batch.batch["attention_mask"].sum(-1))}


def compute_advantage_leaving_out(batch: Batch, left_out: torch.Tensor, algorithm: Any) -> Batch:
    """Advantages over the samples not `left_out` (bool [B]: those whose search was unavailable);
    the left-out ones get zero advantage and return and a zero response mask (left out of every
    loss). `algorithm`: the config section with adv_estimator, gamma, lam, norm_adv_by_std_in_grpo."""
    alg = algorithm
    kwargs = dict(adv_estimator=alg.adv_estimator, gamma=float(alg.gamma), lam=float(alg.lam),
                  norm_adv_by_std_in_grpo=bool(alg.norm_adv_by_std_in_grpo))
    if not bool(left_out.any()):
        return compute_advantage(batch, **kwargs)
    keep = torch.nonzero(~left_out).squeeze(-1)
    mask = batch.batch["response_mask"].clone()
    adv = torch.zeros_like(batch.batch["token_level_rewards"], dtype=torch.float32)
    ret = torch.zeros_like(adv)
    if keep.numel():
        sub = batch[keep.tolist()]
        sub = compute_advantage(sub, **kwargs)
        adv[keep] = sub.batch["advantages"].to(adv.dtype)
        ret[keep] = sub.batch["returns"].to(ret.dtype)
    mask[left_out] = 0
    batch.batch["advantages"] = adv
    batch.batch["returns"] = ret
    batch.batch["response_mask"] = mask
    return batch


def place_outcome_reward(scores: torch.Tensor | Sequence[float], response_mask: torch.Tensor) -> torch.Tensor:
    """Put each sample's scalar score on its last valid response token.

    ``out[i, t] = scores[i]`` for ``t = max{t : response_mask[i, t] = 1}``, 0 elsewhere. A row with
    no valid token keeps its score at position 0, so ``out.sum(-1) == scores`` always holds (the
    loss ignores that row anyway because its mask is empty).
    Returns a float32 tensor [B, R] (or the dtype of ``scores`` when it is floating point).
    """
    scores = torch.as_tensor(scores, device=response_mask.device)
    if not scores.is_floating_point():
        scores = scores.to(torch.float32)
    if scores.dim() != 1 or scores.shape[0] != response_mask.shape[0]:
        raise ValueError(f"scores must have shape [{response_mask.shape[0]}], got {tuple(scores.shape)}")
    bsz, resp_len = response_mask.shape
    out = torch.zeros(bsz, resp_len, dtype=scores.dtype, device=response_mask.device)
    if resp_len == 0:
        if bsz and bool((scores != 0).any()):
            logger.warning("place_outcome_reward: zero-length responses, scores dropped")
        return out
    positions = torch.arange(resp_len, device=response_mask.device).expand(bsz, resp_len)
    last = torch.where(response_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values
    last = last.clamp(min=0)
    out[torch.arange(bsz, device=out.device), last] = scores
    return out


def _response_mask(batch: Batch) -> torch.Tensor:
    """The batch's ``response_mask``, added from the attention mask when it is missing."""
    if "response_mask" not in batch.tensor_keys:
        batch.batch["response_mask"] = compute_response_mask(batch)
    return batch.batch["response_mask"]


def apply_kl_penalty(batch: Batch, kl_ctrl: Any, kl_penalty: str = "kl") -> tuple[Batch, dict[str, float]]:
    r"""KL as a reward penalty:  r_t = score_t - beta * KL_t * m_t,  KL_t = kl_penalty(old, ref).

    Uses ``old_log_probs`` and ``ref_log_prob``; ``beta = kl_ctrl.value`` before the update. The
    controller is then updated with the batch KL  mean_i mean_{t: m} KL_{i,t}  and n_steps = B.
    Writes ``token_level_rewards`` into ``batch`` (in place) and returns (batch, metrics).
    """
    mask = _response_mask(batch)
    scores = batch.batch["token_level_scores"]
    kld = core_algos.kl_penalty(batch.batch["old_log_probs"], batch.batch["ref_log_prob"], kl_penalty=kl_penalty)
    kld = torch.where(mask.bool(), kld, torch.zeros_like(kld))
    beta = float(kl_ctrl.value)
    batch.batch["token_level_rewards"] = scores - beta * kld
    current_kl = masked_mean(kld, mask, dim=-1).mean().item()
    kl_ctrl.update(current_kl=current_kl, n_steps=len(batch))
    metrics = {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": beta}
    return batch, metrics


def compute_advantage(
    batch: Batch,
    adv_estimator: str,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> Batch:
    """Run the registered estimator ``adv_estimator`` and store ``advantages`` and ``returns``.

    Rewards come from ``token_level_rewards`` (or ``token_level_scores`` when no KL penalty was
    applied); groups from ``non_tensor_batch['uid']``; values from ``values`` (GAE). Each estimator
    receives only the arguments its signature names, so custom registered estimators work too.
    """
    fn = core_algos.get_adv_estimator_fn(adv_estimator)
    mask = _response_mask(batch)
    keys = batch.tensor_keys
    if "token_level_rewards" not in keys:
        if "token_level_scores" not in keys:
            raise KeyError("compute_advantage needs token_level_rewards or token_level_scores in the batch")
        batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
    available: dict[str, Any] = {
        "token_level_rewards": batch.batch["token_level_rewards"],
        "response_mask": mask,
        "gamma": gamma,
        "lam": lam,
        "epsilon": epsilon,
        "norm_adv_by_std_in_grpo": norm_adv_by_std_in_grpo,
    }
    if "values" in keys:
        available["values"] = batch.batch["values"]
    if "uid" in batch.non_tensor_batch:
        available["index"] = batch.non_tensor_batch["uid"]
    kwargs = {}
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in available:
            kwargs[name] = available[name]
        elif param.default is inspect.Parameter.empty:
            source = "non_tensor_batch['uid']" if name == "index" else f"batch[{name!r}]"
            raise KeyError(f"advantage estimator {adv_estimator!r} needs {source}")
    advantages, returns = fn(**kwargs)
    batch.batch["advantages"] = advantages
    batch.batch["returns"] = returns
    return batch
