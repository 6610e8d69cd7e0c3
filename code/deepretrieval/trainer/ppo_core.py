"""Driver-side, Batch-level steps of one PPO/GRPO iteration and the metrics computed on them.

These glue the pure tensor functions of :mod:`deepretrieval.algorithms.core_algos` to the
:class:`~deepretrieval.protocol.Batch` keys of the training loop (verl names):

    token_level_scores --apply_kl_penalty--> token_level_rewards --compute_advantage--> advantages, returns

Everything here runs on the driver; nothing touches a model.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from deepretrieval.algorithms import core_algos
from deepretrieval.algorithms.utils import masked_mean
from deepretrieval.protocol import Batch

logger = logging.getLogger(__name__)

__all__ = [
    "place_outcome_reward", "compute_response_mask", "apply_kl_penalty", "compute_advantage",
    "compute_data_metrics", "compute_timing_metrics", "compute_throughput_metrics", "marked_timer",
    "reduce_metrics",
]


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


def compute_response_mask(batch: Batch) -> torch.Tensor:
    """``attention_mask[:, -R:]`` with ``R = responses.shape[1]`` (verl's response mask)."""
    resp_len = batch.batch["responses"].shape[-1]
    return batch.batch["attention_mask"][:, -resp_len:]


def _response_mask(batch: Batch) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def _lengths(batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None, int, int]:
    """(prompt_length [B], response_length [B], max_prompt_len, max_response_len) as floats."""
    keys = batch.tensor_keys
    if "responses" not in keys:
        return None, None, 0, 0
    resp_len = batch.batch["responses"].shape[-1]
    if "attention_mask" in keys and batch.batch["attention_mask"].shape[-1] >= resp_len:
        attn = batch.batch["attention_mask"]
        prompt_length = attn[:, :attn.shape[-1] - resp_len].sum(-1).float()
        response_length = attn[:, attn.shape[-1] - resp_len:].sum(-1).float()
        return prompt_length, response_length, attn.shape[-1] - resp_len, resp_len
    if "response_mask" in keys:
        return None, batch.batch["response_mask"].sum(-1).float(), 0, resp_len
    return None, None, 0, resp_len


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    if values.numel() == 0:
        return {}
    values = values.detach().float()
    return {f"{prefix}/mean": values.mean().item(), f"{prefix}/max": values.max().item(),
            f"{prefix}/min": values.min().item()}


def compute_data_metrics(batch: Batch, use_critic: bool = True) -> dict[str, float]:
    """Batch statistics logged each step (verl names); keys whose inputs are absent are skipped.

    critic/score/{mean,max,min}   sequence score  sum_t token_level_scores
    critic/rewards/{...}          sequence reward sum_t token_level_rewards (after KL penalty)
    critic/advantages/{...}, critic/returns/{...}, critic/values/{...}  over valid tokens
    critic/vf_explained_var       1 - Var(returns - values) / (Var(returns) + 1e-5)  (valid tokens)
    response_length/{mean,max,min,clip_ratio}, prompt_length/{...}  (clip_ratio: share at the cap)
    """
    metrics: dict[str, float] = {}
    keys = batch.tensor_keys
    if "token_level_scores" in keys:
        metrics.update(_stats("critic/score", batch.batch["token_level_scores"].sum(-1)))
    if "token_level_rewards" in keys:
        metrics.update(_stats("critic/rewards", batch.batch["token_level_rewards"].sum(-1)))
    mask = None
    if "response_mask" in keys:
        mask = batch.batch["response_mask"].bool()
    elif "responses" in keys and "attention_mask" in keys:
        mask = compute_response_mask(batch).bool()
    if mask is not None:
        for key, prefix in (("advantages", "critic/advantages"), ("returns", "critic/returns")):
            if key in keys:
                metrics.update(_stats(prefix, torch.masked_select(batch.batch[key], mask)))
        if use_critic and "values" in keys:
            valid_values = torch.masked_select(batch.batch["values"], mask)
            metrics.update(_stats("critic/values", valid_values))
            if "returns" in keys and valid_values.numel() > 1:
                valid_returns = torch.masked_select(batch.batch["returns"], mask).float()
                diff_var = torch.var(valid_returns - valid_values.float())
                ret_var = torch.var(valid_returns)
                metrics["critic/vf_explained_var"] = (1.0 - diff_var / (ret_var + 1e-5)).item()
    prompt_length, response_length, max_prompt, max_resp = _lengths(batch)
    if response_length is not None:
        metrics.update(_stats("response_length", response_length))
        if response_length.numel():
            metrics["response_length/clip_ratio"] = torch.eq(response_length, max_resp).float().mean().item()
    if prompt_length is not None:
        metrics.update(_stats("prompt_length", prompt_length))
        if prompt_length.numel():
            metrics["prompt_length/clip_ratio"] = torch.eq(prompt_length, max_prompt).float().mean().item()
    return metrics


# sections whose per-token cost is measured against response tokens only (the rest: all tokens)
_RESPONSE_TOKEN_SECTIONS = frozenset({"gen"})
_ALL_TOKEN_SECTIONS = frozenset({"old_log_prob", "ref", "values", "adv", "update_critic", "update_actor"})


def compute_timing_metrics(batch: Batch, timings: Mapping[str, float]) -> dict[str, float]:
    """``timing_s/<name>`` for every section, plus ``timing_per_token_ms/<name>`` for model
    sections: ``gen`` per response token, the others per prompt+response token."""
    metrics = {f"timing_s/{name}": float(value) for name, value in timings.items()}
    prompt_length, response_length, _, _ = _lengths(batch)
    n_resp = float(response_length.sum().item()) if response_length is not None else 0.0
    n_all = n_resp + (float(prompt_length.sum().item()) if prompt_length is not None else 0.0)
    for name, value in timings.items():
        n_tokens = n_resp if name in _RESPONSE_TOKEN_SECTIONS else n_all if name in _ALL_TOKEN_SECTIONS else 0.0
        if n_tokens > 0:
            metrics[f"timing_per_token_ms/{name}"] = float(value) * 1000.0 / n_tokens
    return metrics


def compute_throughput_metrics(batch: Batch, timings: Mapping[str, float], n_gpus: int = 1) -> dict[str, float]:
    """perf/total_num_tokens (prompt+response tokens), perf/time_per_step (``timings['step']``),
    perf/throughput = tokens / (time_per_step * n_gpus)  (tokens per second per device)."""
    total = batch.meta_info.get("global_token_num")
    if total is None:
        if "attention_mask" not in batch.tensor_keys:
            return {}
        total = int(batch.batch["attention_mask"].sum().item())
    elif isinstance(total, (list, tuple, np.ndarray)):
        total = int(sum(total))
    metrics: dict[str, float] = {"perf/total_num_tokens": float(total)}
    step_time = timings.get("step")
    if step_time is not None:
        metrics["perf/time_per_step"] = float(step_time)
        if step_time > 0:
            metrics["perf/throughput"] = float(total) / (float(step_time) * max(int(n_gpus), 1))
    return metrics


# verl spelling
compute_throughout_metrics = compute_throughput_metrics


@contextmanager
def marked_timer(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Time the ``with`` block and add the seconds to ``timings[name]`` (accumulates repeats);
    the time is recorded even when the block raises."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def reduce_metrics(metrics: Mapping[str, Sequence[float]] | Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric: accepts ``{name: [values]}`` or ``[{name: value}, ...]``."""
    lists: dict[str, list[float]] = {}
    if isinstance(metrics, Mapping):
        for key, vals in metrics.items():
            vals = vals if isinstance(vals, (list, tuple, np.ndarray)) else [vals]
            lists.setdefault(key, []).extend(float(v) for v in vals)
    else:
        for item in metrics:
            for key, val in item.items():
                lists.setdefault(key, []).append(float(val))
    return {key: float(np.mean(vals)) for key, vals in lists.items() if vals}
