"""Batched, parallel scoring of decoded responses, with per-data-source metrics for wandb.

The manager parses every response first, then searches each distinct (engine, query, k, filters)
once — GRPO samples many answers per prompt and models repeat themselves — in a bounded thread
pool per engine (live engines rate-limit themselves; the pool only caps how many requests wait
at once; an engine that takes a batch, the search service's client, gets them all in one call),
and finally scores every sample from its search. Per-sample results are kept in
`last_results` and returned as `reward_extra_info` for logging.

One bad sample never fails a step: an unexpected exception while scoring one sample (a bug, not
the model's fault) becomes that sample's `reward_error` result (score 0, `search_unavailable=True`
so the trainer leaves it out, like an unavailable search), counted in `reward_error_count`; each
exception class is logged once per manager, with its traceback. Configuration mistakes (a data
source without a reward source, an unknown engine) still raise: they are not one sample's fault.

Metrics (for the whole batch as `reward/<name>`, and per data source as `reward/<ds>/<name>`):
  mean, recall_mean, recall_ge_{70,50,40,30,10,5}_ratio      over samples whose search was not
                                                             unavailable (errors count as recall 0)
  format_error_ratio, too_long_ratio, json_error_ratio, empty_query_ratio, empty_answer_ratio
  (strict_json), query_syntax_error_ratio, search_error_ratio (= search_unavailable),
  search_unavailable_count, reward_error_ratio, reward_error_count      over all samples
  query_len_mean (characters), unique_query_ratio            over samples with a parsed query
  search_cache_hit_ratio (engine cache hits / searches run), searches, search_time_s (wall time
  of the search phase), search_time_mean_s (per search)
  engine/<source>/<counter>   the engine's own cumulative `stats()` (live engines: HTTP retries,
                              server-requested pauses `http_retry_after[_s]`, deadlines, ...)
  overlong_penalty_mean, overlong_ratio   with overlong shaping (rewards.overlong), whole batch
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from deepretrieval.rewards.literature import (
    PreparedSample,
    RewardConfig,
    SearchOutcome,
    finish_sample,
    get_engine,
    prepare_sample,
    resolve_config,
    run_search,
    run_searches,
)
from deepretrieval.rewards.overlong import OverlongBuffer, overlong_metrics
from deepretrieval.rewards.parsing import (
    ERROR_EMPTY_ANSWER,
    ERROR_EMPTY_QUERY,
    ERROR_FORMAT,
    ERROR_JSON,
    ERROR_QUERY_SYNTAX,
    ERROR_REWARD,
    ERROR_SEARCH_UNAVAILABLE,
    ERROR_TOO_LONG,
)
from deepretrieval.search.base import SearchEngineError

logger = logging.getLogger(__name__)

RECALL_THRESHOLDS = (0.7, 0.5, 0.4, 0.3, 0.1, 0.05)

# Default concurrency per engine kind: local searches are CPU-bound, live ones wait on the network.
DEFAULT_WORKERS = {"local": max(1, min(4, os.cpu_count() or 1)), "pubmed": 8, "ctgov": 8}


def _ratio(values: Sequence[bool]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def compute_reward_metrics(results: Sequence[Mapping[str, Any]], prefix: str = "reward/") -> Dict[str, float]:
    """Metrics of one group of per-sample results (see the module docstring)."""
    n = len(results)
    if n == 0:
        return {}
    scored = [r for r in results if not r.get("search_unavailable")]
    recalls = [float(r["recall"] or 0.0) for r in scored]
    queries = [r["query"] for r in results if r.get("query")]
    errors = [r.get("error") for r in results]
    metrics = {
        "mean": float(np.mean([r["score"] for r in scored])) if scored else 0.0,
        "recall_mean": float(np.mean(recalls)) if recalls else 0.0,
    }
    for threshold in RECALL_THRESHOLDS:
        metrics[f"recall_ge_{int(round(threshold * 100))}_ratio"] = _ratio([r >= threshold - 1e-12 for r in recalls])
    metrics.update(
        format_error_ratio=_ratio([e == ERROR_FORMAT for e in errors]),
        too_long_ratio=_ratio([e == ERROR_TOO_LONG for e in errors]),
        json_error_ratio=_ratio([e == ERROR_JSON for e in errors]),
        empty_query_ratio=_ratio([e == ERROR_EMPTY_QUERY for e in errors]),
        empty_answer_ratio=_ratio([e == ERROR_EMPTY_ANSWER for e in errors]),  # strict_json only
        query_syntax_error_ratio=_ratio([e == ERROR_QUERY_SYNTAX for e in errors]),
        search_error_ratio=_ratio([e == ERROR_SEARCH_UNAVAILABLE for e in errors]),
        search_unavailable_count=float(sum(e == ERROR_SEARCH_UNAVAILABLE for e in errors)),
        reward_error_ratio=_ratio([e == ERROR_REWARD for e in errors]),
        reward_error_count=float(sum(e == ERROR_REWARD for e in errors)),
        query_len_mean=float(np.mean([len(q) for q in queries])) if queries else 0.0,
        unique_query_ratio=len(set(queries)) / len(queries) if queries else 0.0,
    )
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def reward_error_result(exc: BaseException, score: float = 0.0) -> Dict[str, Any]:
    """The result of a sample whose scoring raised `exc`: classified `reward_error`, left out of
    the update (`search_unavailable=True`, recall None), with the exception in `error_detail`."""
    return {
        "score": float(score),
        "format_ok": False,
        "query": None,
        "recall": None,
        "n_retrieved": 0,
        "error": ERROR_REWARD,
        "error_detail": f"{type(exc).__name__}: {str(exc)[:500]}",
        "tier": None,
        "format_score": 0.0,
        "answer_score": 0.0,
        "search_unavailable": True,
        "n_targets": 0,
        "search_time_s": 0.0,
        "cached": False,
    }


class RewardManager:
    """Scores decoded responses with the literature reward (or a custom `compute_score`).

    Args:
        tokenizer: decodes `responses` in `__call__` (not needed for `score_texts`).
        config: the `reward` section (see deepretrieval.rewards.literature); `num_workers` caps
            the threads per engine (default: DEFAULT_WORKERS by engine kind).
        compute_score: a verl-style function `(data_source, solution_str, ground_truth,
            extra_info) -> float | dict`; when given it replaces the built-in reward and is called
            once per sample (no deduplication: the manager cannot see its searches).
        num_examine: how many decoded responses per data source to print per call (debugging).
        overlong: DAPO's soft overlong punishment (rewards.overlong), added in `__call__` (which
            knows the token lengths) to every scored sample's score; None: no length shaping.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        config: Any = None,
        compute_score: Optional[Callable[..., Any]] = None,
        num_examine: int = 0,
        overlong: Optional[OverlongBuffer] = None,
    ):
        self.tokenizer = tokenizer
        self.reward_config: RewardConfig = resolve_config(config)
        getter = getattr(config, "get", None)  # dict or DictConfig
        self.num_workers: Optional[int] = getter("num_workers") if callable(getter) else None
        self.custom_compute_score = compute_score
        self.num_examine = num_examine
        self.overlong = overlong
        self.last_results: List[Dict[str, Any]] = []
        self.last_search_stats: Dict[str, float] = {}
        self.last_engine_stats: Dict[str, float] = {}
        self._logged_error_classes: set = set()

    def _guarded(self, what: str, fn: Callable[..., Any], *args: Any) -> Tuple[Any, Optional[Dict[str, Any]]]:
        """(fn(*args), None), or (None, a reward_error result) when it raises; each exception class
        is logged once per manager (with its traceback), later ones at debug level."""
        try:
            return fn(*args), None
        except Exception as exc:  # one sample must never fail the step (see the module docstring)
            name = type(exc).__name__
            if name not in self._logged_error_classes:
                self._logged_error_classes.add(name)
                logger.exception("reward_error: %s raised %s for one sample; it is left out of the update "
                                 "(further %s errors are counted in reward/reward_error_count)", what, name, name)
            else:
                logger.debug("reward_error: %s raised %s: %s", what, name, exc)
            return None, reward_error_result(exc)

    # ------------------------------------------------------------ scoring texts

    def _workers_for(self, sample: PreparedSample, n_jobs: int) -> int:
        limit = sample.source.num_workers or self.num_workers or DEFAULT_WORKERS.get(sample.source.engine, 4)
        return max(1, min(int(limit), n_jobs))

    def _search_all(self, samples: Sequence[PreparedSample]) -> Dict[Tuple, SearchOutcome]:
        """Run each distinct search once; engines run side by side, each in its own bounded pool."""
        jobs: Dict[Tuple, PreparedSample] = {}
        for sample in samples:
            if sample.needs_search:
                jobs.setdefault(sample.search_key(), sample)
        by_engine: Dict[str, List[Tuple[Tuple, PreparedSample]]] = defaultdict(list)
        for key, sample in jobs.items():
            by_engine[key[0]].append((key, sample))
        outcomes: Dict[Tuple, SearchOutcome] = {}
        used: Dict[str, Any] = {}
        pools = []
        futures = []
        for engine_jobs in by_engine.values():
            first = engine_jobs[0][1]
            try:
                engine = get_engine(first.source)
            except SearchEngineError as exc:  # e.g. an index that is not there: the searches are unavailable
                # (configuration errors such as unknown engines or options raise: they are not transient)
                logger.error("cannot open the engine for %s: %s", first.data_source, exc)
                for key, _ in engine_jobs:
                    outcomes[key] = SearchOutcome([], ERROR_SEARCH_UNAVAILABLE, f"engine: {exc}")
                continue
            used[first.source.name] = engine
            if callable(getattr(engine, "search_requests", None)):  # the search service: one batched call
                batch = run_searches([sample for _, sample in engine_jobs], engine)
                outcomes.update((key, outcome) for (key, _), outcome in zip(engine_jobs, batch))
                continue
            workers = self._workers_for(first, len(engine_jobs))
            if workers == 1:
                for key, sample in engine_jobs:
                    outcomes[key] = run_search(sample, engine)
                continue
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward-search")
            pools.append(pool)
            futures.extend((key, pool.submit(run_search, sample, engine)) for key, sample in engine_jobs)
        for key, future in futures:
            outcomes[key] = future.result()
        for pool in pools:
            pool.shutdown(wait=True)
        self.last_engine_stats = {f"engine/{name}/{k}": float(v) for name, engine in used.items()
                                  if callable(getattr(engine, "stats", None)) for k, v in engine.stats().items()}
        return outcomes

    def score_texts(
        self,
        solutions: Sequence[str],
        data_sources: Sequence[str],
        ground_truths: Sequence[Any],
        extra_infos: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
    ) -> List[Dict[str, Any]]:
        """Score decoded responses; returns one reward dict per sample (see compute_score)."""
        n = len(solutions)
        if not (len(data_sources) == len(ground_truths) == n):
            raise ValueError("solutions, data_sources and ground_truths must have the same length")
        extra_infos = list(extra_infos) if extra_infos is not None else [None] * n
        start = time.perf_counter()
        if self.custom_compute_score is not None:
            results = []
            for s, d, g, e in zip(solutions, data_sources, ground_truths, extra_infos):
                result, failed = self._guarded("compute_score", self._custom, s, d, g, e)
                results.append(failed if failed is not None else result)
            self.last_search_stats = {"search_time_s": time.perf_counter() - start, "searches": float(n)}
            self.last_results = results
            return results
        for ds in set(map(str, data_sources)):
            self.reward_config.source(ds)  # a data source without a reward source is a setup mistake: raise
        prepared = [
            self._guarded("prepare_sample", prepare_sample, str(d), s, g, e, self.reward_config)
            for s, d, g, e in zip(solutions, data_sources, ground_truths, extra_infos)
        ]
        samples = [sample for sample, _ in prepared if sample is not None]
        outcomes = self._search_all(samples)
        search_time = time.perf_counter() - start
        results = []
        for sample, failed in prepared:
            if failed is None:
                outcome = outcomes.get(sample.search_key()) if sample.needs_search else None
                result, failed = self._guarded("finish_sample", finish_sample, sample, outcome)
            results.append(failed if failed is not None else result)
        run = list(outcomes.values())
        self.last_search_stats = {
            "searches": float(len(run)),
            "search_time_s": search_time,
            "search_time_mean_s": float(np.mean([o.elapsed_s for o in run])) if run else 0.0,
            "search_cache_hit_ratio": _ratio([o.cached for o in run]),
        }
        self.last_search_stats.update(self.last_engine_stats)
        self.last_results = results
        return results

    def _custom(self, solution: str, data_source: str, ground_truth: Any, extra_info: Any) -> Dict[str, Any]:
        value = self.custom_compute_score(
            data_source=data_source, solution_str=solution, ground_truth=ground_truth, extra_info=extra_info
        )
        if isinstance(value, Mapping):
            result = dict(value)
            result.setdefault("error", "none")
            result.setdefault("search_unavailable", result["error"] == ERROR_SEARCH_UNAVAILABLE)
            result.setdefault("recall", None)
            result.setdefault("query", None)
            return result
        return {"score": float(value), "error": "none", "search_unavailable": False, "recall": None, "query": None}

    # ------------------------------------------------------------ metrics

    def metrics(self, results: Sequence[Mapping[str, Any]], data_sources: Sequence[str]) -> Dict[str, float]:
        out = compute_reward_metrics(results)
        out.update({f"reward/{k}": v for k, v in self.last_search_stats.items()})
        groups: Dict[str, List[Mapping[str, Any]]] = defaultdict(list)
        for result, ds in zip(results, data_sources):
            groups[str(ds)].append(result)
        for ds, group in sorted(groups.items()):
            out.update(compute_reward_metrics(group, prefix=f"reward/{ds}/"))
        return out

    # ------------------------------------------------------------ verl-style call on a Batch

    def decode_responses(self, batch: Any) -> Tuple[List[str], List[int]]:
        """Decoded responses (special tokens skipped) and their valid lengths."""
        responses = batch.batch["responses"]
        if "response_mask" in batch.batch.keys():
            mask = batch.batch["response_mask"]
        else:
            mask = batch.batch["attention_mask"][:, -responses.shape[-1] :]
        lengths = mask.sum(dim=-1).long().tolist()
        texts = [
            self.tokenizer.decode(responses[i, :length].tolist(), skip_special_tokens=True)
            for i, length in enumerate(lengths)
        ]
        return texts, lengths

    def __call__(self, batch: Any, return_dict: bool = True) -> Any:
        import torch

        responses = batch.batch["responses"]
        texts, lengths = self.decode_responses(batch)
        ntb = batch.non_tensor_batch
        n = len(texts)
        data_sources = [str(d) for d in ntb["data_source"]] if "data_source" in ntb else ["pubmed_mini"] * n
        ground_truths = [rm.get("ground_truth") if isinstance(rm, Mapping) else rm for rm in ntb["reward_model"]]
        extra_infos = list(ntb["extra_info"]) if "extra_info" in ntb else [None] * n
        results = self.score_texts(texts, data_sources, ground_truths, extra_infos)
        penalties = self._shape_lengths(results, lengths)

        reward_tensor = torch.zeros(responses.shape, dtype=torch.float32)
        for i, (result, length) in enumerate(zip(results, lengths)):
            if length > 0:
                reward_tensor[i, length - 1] = float(result["score"])
        self._examine(texts, data_sources, results)
        if not return_dict:
            return reward_tensor
        keys = ("score", "recall", "error", "format_ok", "query", "n_retrieved", "tier", "search_unavailable")
        extra = {key: [r.get(key) for r in results] for key in keys}
        extra["search_unavailable"] = [bool(v) for v in extra["search_unavailable"]]
        metrics = self.metrics(results, data_sources)
        if penalties is not None:
            extra["overlong_penalty"] = penalties
            metrics.update(overlong_metrics(penalties))
        return {"reward_tensor": reward_tensor, "reward_extra_info": extra, "metrics": metrics}

    def _shape_lengths(self, results: Sequence[Dict[str, Any]], lengths: Sequence[int]) -> Optional[List[float]]:
        """With `overlong` set: each sample's penalty for its token length, added to its score
        (`overlong_penalty` in its result); samples left out of the update (search unavailable)
        keep their score. None without shaping."""
        if self.overlong is None:
            return None
        penalties = [self.overlong.penalty(length) for length in lengths]
        for result, penalty in zip(results, penalties):
            result["overlong_penalty"] = penalty
            if not result.get("search_unavailable"):
                result["score"] = float(result["score"]) + penalty
        return penalties

    def _examine(self, texts: Sequence[str], data_sources: Sequence[str], results: Sequence[Mapping[str, Any]]) -> None:
        if self.num_examine <= 0:
            return
        shown: Dict[str, int] = defaultdict(int)
        for text, ds, result in zip(texts, data_sources, results):
            if shown[ds] >= self.num_examine:
                continue
            shown[ds] += 1
            print(f"[{ds}] response: {text}")
            print(f"[{ds}] query={result.get('query')!r} recall={result.get('recall')} "
                  f"error={result.get('error')} score={result.get('score')}")
