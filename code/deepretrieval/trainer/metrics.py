"""Metrics of one PPO step and the timer of its phases (verl's `metric_utils`).

Everything here reads a :class:`~deepretrieval.protocol.Batch` (or a dict of seconds) and returns
``{name: float}`` without changing the batch. Timings are logged once, as ``timing_s/<phase>``
(:func:`compute_timing_metrics`); the phases are the :func:`marked_timer` blocks of
:func:`deepretrieval.trainer.step.ppo_step`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch

from deepretrieval.protocol import Batch


def compute_response_mask(batch: Batch) -> torch.Tensor:
    """``attention_mask[:, -R:]`` with ``R = responses.shape[1]`` (verl's response mask)."""
    resp_len = batch.batch["responses"].shape[-1]
    return batch.batch["attention_mask"][:, -resp_len:]


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


@contextmanager
def marked_timer(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Time the ``with`` block and add the seconds to ``timings[name]`` (accumulates repeats);
    the time is recorded even when the block raises."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

