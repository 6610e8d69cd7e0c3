import math

import numpy as np
import pytest

from deepretrieval.eval.metrics import aggregate_samples, bootstrap_ci, paired_bootstrap_ci
from deepretrieval.search.metrics import ndcg_at_k, precision_at_k, query_metrics, recall_at_k


def test_recall_precision_by_hand():
    ranked = ["a", "x", "b", "y", "c"]
    rel = {"a", "b", "c", "d"}
    assert recall_at_k(ranked, rel, 1) == 0.25
    assert recall_at_k(ranked, rel, 3) == 0.5
    assert recall_at_k(ranked, rel, 100) == 0.75
    assert precision_at_k(ranked, rel, 2) == 0.5
    # fewer results than K: missing ranks count as misses (trec_eval P_k)
    assert precision_at_k(ranked, rel, 10) == 0.3
    assert recall_at_k(ranked, set(), 10) is None


def test_duplicates_are_not_counted_twice():
    assert recall_at_k(["a", "a", "b"], {"a", "b"}, 2) == 0.5
    assert recall_at_k(["a", "a", "b"], {"a", "b"}, 3) == 1.0
    assert precision_at_k(["a", "a"], {"a"}, 2) == 0.5
    # the repeated "a" at rank 2 earns nothing; "b" at rank 3 keeps its discount
    assert ndcg_at_k(["a", "a", "b"], {"a": 1, "b": 1}, 3) == pytest.approx(
        (1 + 1 / 2) / (1 + 1 / math.log2(3)))


def test_ndcg_by_hand():
    judg = {"a": 2, "b": 1, "c": 0, "d": 2}
    # ranking: c(0), a(2), b(1) ; DCG@3 = 2/log2(3) + 1/log2(4)
    dcg = 2 / math.log2(3) + 1 / 2
    idcg = 2 / 1 + 2 / math.log2(3) + 1 / 2  # ideal: a/d(2), d/a(2), b(1)
    assert ndcg_at_k(["c", "a", "b"], judg, 3) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["a", "d", "b"], judg, 3) == pytest.approx(1.0)
    assert ndcg_at_k(["z"], judg, 3) == 0.0
    assert ndcg_at_k(["a"], {"a": 0}, 3) is None


def test_query_metrics_keys():
    m = query_metrics(["a", "b"], {"a"}, [1, 10], judgements={"a": 1})
    assert m == {
        "recall@1": 1.0, "precision@1": 1.0, "ndcg@1": 1.0,
        "recall@10": 1.0, "precision@10": 0.1, "ndcg@10": 1.0,
    }
    assert "ndcg@1" not in query_metrics(["a"], {"a"}, [1])


def test_bootstrap_matches_independent_reference():
    vals = [0.1, 0.5, 0.9, 0.3, 0.7, 0.2]
    ci = bootstrap_ci(vals, n_resamples=4000, seed=3)
    assert ci.mean == pytest.approx(np.mean(vals))
    # independent reference: a plain-python loop with the same generator stream
    rng = np.random.default_rng(3)
    idx = rng.integers(0, len(vals), size=(4000, len(vals)))
    means = sorted(sum(vals[j] for j in row) / len(vals) for row in idx)
    lo = np.quantile(means, 0.025)
    hi = np.quantile(means, 0.975)
    assert ci.low == pytest.approx(lo) and ci.high == pytest.approx(hi)
    assert ci.low < ci.mean < ci.high
    # the normal-approximation interval is close for this sample
    se = np.std(vals, ddof=0) / math.sqrt(len(vals))
    assert abs((ci.high - ci.low) - 2 * 1.96 * se) < 0.12


def test_bootstrap_edge_cases():
    assert bootstrap_ci([0.4]).to_dict() == {"mean": 0.4, "low": 0.4, "high": 0.4, "n": 1}
    empty = bootstrap_ci([None, float("nan")])
    assert empty.n == 0 and math.isnan(empty.mean)
    const = bootstrap_ci([0.5] * 5)
    assert const.low == const.high == 0.5


def test_paired_bootstrap_resamples_topics_not_scores():
    a = [0.9, 0.1, 0.5, 0.7, None]
    b = [0.8, 0.0, 0.3, 0.7, 0.4]  # the last topic lacks a's score: dropped from both
    ci = paired_bootstrap_ci(a, b, n_resamples=3000, seed=5)
    diffs = [0.1, 0.1, 0.2, 0.0]
    assert ci.n == 4 and ci.mean == pytest.approx(0.1)
    # reference: resample topic indices, average the differences
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 4, size=(3000, 4))
    means = [sum(diffs[j] for j in row) / 4 for row in idx]
    assert ci.low == pytest.approx(np.quantile(means, 0.025)) and ci.high == pytest.approx(np.quantile(means, 0.975))
    # every difference >= 0: the interval cannot go below 0, although the unpaired intervals of a and b overlap
    assert ci.low >= 0.0
    assert bootstrap_ci(a[:4]).low < bootstrap_ci(b[:4]).high
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap_ci([0.1], [0.1, 0.2])


def test_aggregate_samples():
    assert aggregate_samples([0.2, 0.4, None], "mean") == pytest.approx(0.3)
    assert aggregate_samples([0.2, 0.4], "best") == 0.4
    assert aggregate_samples([None], "mean") is None
    with pytest.raises(ValueError):
        aggregate_samples([0.1], "median")
