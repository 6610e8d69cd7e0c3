"""How a worker-group call is split over the data-parallel workers and how the answers are joined.

A worker method declares its mode with `@register(Dispatch.X)`; the worker group reads it:

- `ONE_TO_ALL`        every worker gets the same arguments; the answer is the list of results.
- `RANK_ZERO`         every worker runs (collectives need all of them); the answer is rank 0's.
- `DP_COMPUTE_PROTO`  each `Batch` argument is padded to a multiple of the worker count (copies of
                      its first rows), split in equal consecutive chunks, one per rank; the
                      answers are concatenated in rank order and the padding is dropped again.
                      Answers may be Batches, tensors (first dim = samples) or metric dicts
                      (averaged over ranks, as every rank saw an equal share of the data).
- `ALL_TO_ALL`        arguments are already lists with one entry per worker.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from deepretrieval.protocol import Batch

DISPATCH_ATTR = "_dr_dispatch_mode"


class Dispatch(str, Enum):
    ONE_TO_ALL = "one_to_all"
    RANK_ZERO = "rank_zero"
    DP_COMPUTE_PROTO = "dp_compute_proto"
    ALL_TO_ALL = "all_to_all"


def register(dispatch_mode: Dispatch = Dispatch.ALL_TO_ALL) -> Callable:
    """Mark a worker method as callable through a worker group with `dispatch_mode`."""

    def deco(fn: Callable) -> Callable:
        setattr(fn, DISPATCH_ATTR, Dispatch(dispatch_mode))
        return fn

    return deco


def dispatch_mode_of(cls: type, method: str) -> Dispatch:
    fn = getattr(cls, method, None)
    if fn is None or not callable(fn):
        raise AttributeError(f"{cls.__name__} has no method {method!r}")
    mode = getattr(fn, DISPATCH_ATTR, None)
    if mode is None:
        raise AttributeError(f"{cls.__name__}.{method} is not registered for worker-group calls (@register)")
    return mode


def split_batch(batch: Batch, world_size: int) -> Tuple[List[Batch], int, int]:
    """Pad `batch` to a multiple of `world_size` and chunk it; returns (chunks, pad_size, padded_len)."""
    padded, pad = batch.pad_to_divisor(world_size)
    return padded.chunk(world_size), pad, len(padded)


def dispatch_args(mode: Dispatch, world_size: int, args: Sequence[Any], kwargs: Dict[str, Any]):
    """Per-rank (args, kwargs) lists and the padding record needed by `collect`."""
    pad_info: Tuple[int, int] = (0, 0)
    if mode in (Dispatch.ONE_TO_ALL, Dispatch.RANK_ZERO):
        return [list(args)] * world_size, [dict(kwargs)] * world_size, pad_info
    if mode == Dispatch.ALL_TO_ALL:
        for a in list(args) + list(kwargs.values()):
            if not isinstance(a, (list, tuple)) or len(a) != world_size:
                raise ValueError(f"ALL_TO_ALL arguments must be sequences of length {world_size}")
        return ([[a[r] for a in args] for r in range(world_size)],
                [{k: v[r] for k, v in kwargs.items()} for r in range(world_size)], pad_info)
    if mode == Dispatch.DP_COMPUTE_PROTO:
        per_args: List[List[Any]] = [[] for _ in range(world_size)]
        per_kwargs: List[Dict[str, Any]] = [{} for _ in range(world_size)]
        pads = set()

        def split(value):
            if isinstance(value, Batch):
                chunks, pad, padded_len = split_batch(value, world_size)
                pads.add((pad, padded_len))
                return chunks
            return [value] * world_size

        for a in args:
            for r, part in enumerate(split(a)):
                per_args[r].append(part)
        for k, v in kwargs.items():
            for r, part in enumerate(split(v)):
                per_kwargs[r][k] = part
        if len(pads) > 1:
            raise ValueError("DP_COMPUTE_PROTO Batch arguments must have the same length")
        return per_args, per_kwargs, (pads.pop() if pads else pad_info)
    raise ValueError(f"unknown dispatch mode {mode}")


def _unpad_rows(total_rows: int, pad: int, padded_len: int) -> int:
    """Rows to drop from a joined answer: outputs can hold several rows per input row (n samples)."""
    if pad == 0:
        return 0
    if total_rows % padded_len:
        raise ValueError(f"answer of {total_rows} rows is not a multiple of the {padded_len} rows sent")
    return pad * (total_rows // padded_len)


def _reduce_fn(key: str):
    """Peaks and maxima combine by max, minima by min, everything else by the mean."""
    if "/max" in key or key.endswith("_max"):
        return np.max
    if "/min" in key or key.endswith("_min"):
        return np.min
    return np.mean


def average_metrics(dicts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Numeric metrics reduced over ranks (mean; max for `*/max*` peaks, min for `*/min*`); lists
    are concatenated; other values are taken from rank 0."""
    out: Dict[str, Any] = {}
    for key in dicts[0]:
        values = [d[key] for d in dicts if key in d]
        first = values[0]
        if isinstance(first, (int, float, np.floating, np.integer)) and not isinstance(first, bool):
            out[key] = float(_reduce_fn(key)([float(v) for v in values]))
        elif isinstance(first, torch.Tensor) and first.numel() == 1:
            out[key] = float(torch.stack([v.float().reshape(()) for v in values]).mean())
        elif isinstance(first, list):
            out[key] = [x for v in values for x in v]
        else:
            out[key] = first
    return out


def collect(mode: Dispatch, outputs: List[Any], pad_info: Tuple[int, int] = (0, 0)) -> Any:
    """Join per-rank answers according to `mode` (see the module docstring)."""
    if mode == Dispatch.RANK_ZERO:
        return outputs[0]
    if mode in (Dispatch.ONE_TO_ALL, Dispatch.ALL_TO_ALL):
        return outputs
    pad, padded_len = pad_info
    first = outputs[0]
    if first is None:
        return None
    if isinstance(first, Batch):
        joined = Batch.concat(outputs)
        return joined.unpad(_unpad_rows(len(joined), pad, padded_len))
    if isinstance(first, torch.Tensor):
        joined = torch.cat(outputs, dim=0)
        drop = _unpad_rows(joined.shape[0], pad, padded_len)
        return joined[: joined.shape[0] - drop] if drop else joined
    if isinstance(first, dict):
        return average_metrics(outputs)
    if isinstance(first, tuple):
        return tuple(collect(mode, [o[i] for o in outputs], pad_info) for i in range(len(first)))
    raise TypeError(f"cannot join answers of type {type(first).__name__} for DP_COMPUTE_PROTO")
