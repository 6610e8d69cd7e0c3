"""Aggregation of per-query metrics over samples and topics, and bootstrap intervals.

The per-query metrics (recall/precision/NDCG@K, their definitions, and what a topic without
relevant documents gets) are deepretrieval.search.metrics, the module the reward uses too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np


@dataclass
class Interval:
    """A mean with its percentile-bootstrap interval over topics."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap_ci(
    values: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of the mean.

    Draws `n_resamples` samples of size n with replacement from `values` (the per-topic scores),
    takes each sample's mean, and returns the (1-c)/2 and (1+c)/2 quantiles of those means.
    The seed is fixed so a table is reproducible. NaN/None values are dropped first.
    """
    arr = np.asarray([v for v in values if v is not None and not math.isnan(float(v))], dtype=float)
    n = len(arr)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    mean = float(arr.mean())
    if n == 1:
        return Interval(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, n, size=(n_resamples, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(mean, float(low), float(high), n)


def paired_bootstrap_ci(
    a: Sequence[Optional[float]],
    b: Sequence[Optional[float]],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of the mean paired difference mean_t (a_t - b_t).

    `a` and `b` are per-topic scores of two methods on the same topics, in the same order. Topics
    (not the two scores separately) are resampled with replacement: d_t = a_t - b_t, then the
    interval of the mean of d over `n_resamples` resamples of size n, as `bootstrap_ci`. A topic
    missing either score (None/NaN) is dropped from both. Pairing removes the between-topic
    variance both methods share, which is most of it on small topic sets.
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)
             if x is not None and y is not None and not math.isnan(float(x)) and not math.isnan(float(y))]
    return bootstrap_ci(diffs, confidence, n_resamples, seed)


def aggregate_samples(per_sample: Sequence[Optional[float]], how: str = "mean") -> Optional[float]:
    """Collapse the n sampled queries of one topic: "mean" (expected score) or "best" (best-of-n).

    Failed samples carry a score of 0 (the query retrieved nothing), so they count against both.
    """
    vals = [v for v in per_sample if v is not None]
    if not vals:
        return None
    if how == "mean":
        return float(sum(vals) / len(vals))
    if how in ("best", "max", "best_of_n"):
        return float(max(vals))
    raise ValueError(f"unknown aggregation {how!r}; use 'mean' or 'best'")
