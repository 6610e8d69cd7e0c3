"""Retrieval metrics for one ranked list, aggregation over topics, and bootstrap intervals.

All per-query metrics take the ranked document ids the engine returned and the judgements of
one topic; ranks start at 1 and only the first K ids count. Definitions follow trec_eval:

    recall@K    = |top_K ∩ R| / |R|                       (R: ids judged relevant, grade >= 1)
    precision@K = |top_K ∩ R| / K                         (K, not len(top_K): an engine that
                                                           returns fewer than K ids is not rewarded
                                                           for it, as in trec_eval's P_cut)
    DCG@K       = sum_{i=1..K} g(d_i) / log2(i + 1)       (g: the judged grade, 0 if unjudged —
                                                           linear gain, trec_eval's ndcg_cut)
    NDCG@K      = DCG@K / IDCG@K                          (IDCG: DCG of the judged ids sorted by grade)

A topic without relevant documents has no recall (None); callers leave it out of means.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np


def _top_k(ids: Sequence[str], k: int) -> List[Optional[str]]:
    """The first k ranks; a repeated id keeps its rank but counts once (later copies become None)."""
    seen, out = set(), []
    for doc in list(ids)[:k]:
        out.append(None if doc in seen else doc)
        seen.add(doc)
    return out


def recall_at_k(ranked: Sequence[str], relevant: Iterable[str], k: int) -> Optional[float]:
    """|top_k ∩ relevant| / |relevant|; None when there is nothing relevant to find."""
    rel = set(relevant)
    if not rel:
        return None
    return len(rel.intersection(_top_k(ranked, k))) / len(rel)


def precision_at_k(ranked: Sequence[str], relevant: Iterable[str], k: int) -> float:
    """|top_k ∩ relevant| / k (trec_eval P_k: missing ranks count as non-relevant)."""
    if k <= 0:
        raise ValueError("k must be positive")
    return len(set(relevant).intersection(_top_k(ranked, k))) / k


def ndcg_at_k(ranked: Sequence[str], judgements: Mapping[str, float], k: int) -> Optional[float]:
    """Normalised DCG with linear gains = judged grade (unjudged = 0); None if no positive grade."""
    gains = sorted((float(g) for g in judgements.values() if float(g) > 0), reverse=True)[:k]
    if not gains:
        return None
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    dcg = sum(
        float(judgements.get(doc, 0.0)) / math.log2(i + 2)
        for i, doc in enumerate(_top_k(ranked, k))
        if doc is not None and float(judgements.get(doc, 0.0)) > 0
    )
    return dcg / idcg


def query_metrics(
    ranked: Sequence[str],
    relevant: Iterable[str],
    ks: Sequence[int],
    judgements: Optional[Mapping[str, float]] = None,
) -> Dict[str, Optional[float]]:
    """recall@k and precision@k for every k, plus ndcg@k when graded judgements are given."""
    rel = set(relevant)
    out: Dict[str, Optional[float]] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranked, rel, k)
        out[f"precision@{k}"] = precision_at_k(ranked, rel, k)
        if judgements:
            out[f"ndcg@{k}"] = ndcg_at_k(ranked, judgements, k)
    return out


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
