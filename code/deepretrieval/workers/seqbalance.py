"""Token-budget micro-batches and token-balanced data-parallel partitions (pure functions on lengths).

With ``use_dynamic_bsz`` a micro-batch is not a fixed number of samples but as many samples as fit a
token budget (``ppo_max_token_len_per_gpu``, ``log_prob_max_token_len_per_gpu``), counting each
sample's valid tokens (``attention_mask.sum()``, what a padding-free forward computes): short
rollouts share a forward, long ones do not blow up memory. verl's ``rearrange_micro_batches``.

* :func:`token_budget_micro_batches` — first-fit decreasing bin packing: samples sorted by length
  (longest first), each put into the first micro-batch it fits, a new one opened otherwise. Every
  micro-batch holds at most ``max_token_len`` tokens; FFD uses at most ``11/9 OPT + 6/9`` bins.
* :func:`balanced_partitions` — ``k`` groups with (near-)equal token sums, optionally of equal sizes
  (longest-processing-time greedy: the next-longest sample goes to the lightest group that still
  has room). Used to balance a batch over data-parallel ranks before dispatch (verl's
  ``_balance_batch``), so no rank waits for one that got all the long samples.
* :func:`inverse_permutation` — puts results computed in micro-batch order back in batch order.
"""

from __future__ import annotations

import heapq
from typing import List, Sequence

import torch


def _lengths(seqlens: Sequence[int]) -> List[int]:
    out = [int(x) for x in (seqlens.tolist() if torch.is_tensor(seqlens) else seqlens)]
    if any(x < 0 for x in out):
        raise ValueError("sequence lengths must be >= 0")
    return out


def token_budget_micro_batches(seqlens: Sequence[int], max_token_len: int) -> List[List[int]]:
    """Index lists (each sorted ascending) covering ``range(len(seqlens))`` exactly once, each with a
    token sum ``<= max_token_len``. Raises ValueError when one sample alone exceeds the budget."""
    lens = _lengths(seqlens)
    budget = int(max_token_len)
    if budget <= 0:
        raise ValueError(f"max_token_len must be > 0, got {max_token_len}")
    too_long = [i for i, x in enumerate(lens) if x > budget]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lens[too_long[0]]} tokens, more than the micro-batch token "
                         f"budget {budget} (raise *_max_token_len_per_gpu to at least prompt + response length)")
    bins: List[List[int]] = []
    loads: List[int] = []
    for i in sorted(range(len(lens)), key=lambda k: (-lens[k], k)):
        for b, load in enumerate(loads):
            if load + lens[i] <= budget:
                bins[b].append(i)
                loads[b] += lens[i]
                break
        else:
            bins.append([i])
            loads.append(lens[i])
    return [sorted(b) for b in bins]


def balanced_partitions(seqlens: Sequence[int], k_partitions: int, equal_size: bool = True) -> List[List[int]]:
    """``k_partitions`` index lists (each sorted ascending) covering every sample once, with token sums
    as equal as the greedy gets. ``equal_size`` demands ``len(seqlens) % k == 0`` and gives each group
    ``len / k`` samples (data-parallel ranks must receive equal shares)."""
    lens = _lengths(seqlens)
    k = int(k_partitions)
    if k <= 0:
        raise ValueError(f"k_partitions must be > 0, got {k_partitions}")
    n = len(lens)
    if equal_size and n % k:
        raise ValueError(f"{n} samples do not split into {k} equal-size partitions")
    if n < k:
        raise ValueError(f"{n} samples cannot fill {k} partitions")
    cap = n // k if equal_size else n
    parts: List[List[int]] = [[] for _ in range(k)]
    heap = [(0, p) for p in range(k)]  # (token load, partition)
    for i in sorted(range(n), key=lambda j: (-lens[j], j)):
        full = []
        while True:
            load, p = heapq.heappop(heap)
            if len(parts[p]) < cap:
                break
            full.append((load, p))  # at capacity: out of the running for the rest
        parts[p].append(i)
        heapq.heappush(heap, (load + lens[i], p))
        for item in full:
            if len(parts[item[1]]) < cap:
                heapq.heappush(heap, item)
    if not equal_size and any(not p for p in parts):
        raise ValueError("a partition is empty")
    return [sorted(p) for p in parts]


def dp_balanced_order(seqlens: Sequence[int], world_size: int) -> List[int]:
    """A batch order whose ``world_size`` contiguous equal chunks (what data-parallel dispatch hands
    each rank) have balanced token sums: the partitions of :func:`balanced_partitions`, concatenated."""
    return [i for part in balanced_partitions(seqlens, world_size, equal_size=True) for i in part]


def inverse_permutation(order: Sequence[int]) -> List[int]:
    """``inv`` with ``inv[order[j]] = j``: ``results_in_order[inv]`` is in the original order."""
    order = [int(x) for x in order]
    inv = [0] * len(order)
    for j, i in enumerate(order):
        inv[i] = j
    if sorted(order) != list(range(len(order))):
        raise ValueError("order is not a permutation")
    return inv
