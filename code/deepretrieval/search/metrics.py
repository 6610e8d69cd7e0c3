"""Retrieval metrics of one ranked list: the one definition the reward and the evaluation share.

All take the ranked document ids the engine returned and the judgements of one topic; ranks
start at 1 and only the first K ids count. Definitions follow trec_eval:

    recall@K    = |top_K ∩ R| / |R|                       (R: ids judged relevant, grade >= 1)
    precision@K = |top_K ∩ R| / K                         (K, not len(top_K): an engine that
                                                           returns fewer than K ids is not rewarded
                                                           for it, as in trec_eval's P_cut)
    DCG@K       = sum_{i=1..K} g(d_i) / log2(i + 1)       (g: the judged grade, 0 if unjudged —
                                                           linear gain, trec_eval's ndcg_cut)
    NDCG@K      = DCG@K / IDCG@K                          (IDCG: DCG of the judged ids sorted by grade)

A topic without relevant documents has no recall: `recall_at_k` returns None (undefined). The
evaluation leaves such a topic out of its means (deepretrieval.eval.report); the reward
(deepretrieval.rewards.literature.finish_sample) scores it as recall 0, below every tier, with a
warning, because a training sample must get a number.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence


def _top_k(ids: Sequence[str], k: int) -> List[Optional[str]]:
    """The first k ranks; a repeated id keeps its rank but counts once (later copies become None)."""
    seen, out = set(), []
    for doc in list(ids)[:k]:
        out.append(None if doc in seen else doc)
        seen.add(doc)
    return out


def recall_at_k(ranked: Sequence[Any], relevant: Iterable[Any], k: Optional[int] = None) -> Optional[float]:
    """|top_k ∩ relevant| / |relevant| (ids compared as strings; a repeated id counts once; k None:
    the whole list); None when there is nothing relevant to find (undefined, not 0)."""
    rel = {str(doc) for doc in relevant}
    if not rel:
        return None
    top = list(ranked) if k is None else list(ranked)[:k]
    return len(rel.intersection(str(doc) for doc in top)) / len(rel)


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
