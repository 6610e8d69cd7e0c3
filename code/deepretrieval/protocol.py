"""The unit of data that flows between the driver and the worker roles.

A :class:`Batch` bundles three things that share the leading (batch) dimension ``B``:

* ``batch`` — a :class:`tensordict.TensorDict` with ``batch_size == [B]`` (or ``None`` when the
  batch carries no tensors),
* ``non_tensor_batch`` — ``dict[str, np.ndarray]`` of ``dtype=object`` arrays of length ``B``
  holding per-sample Python objects (ground truths, uids, raw prompts, ...),
* ``meta_info`` — a plain ``dict`` of batch-level settings (temperature, validate, ...).

The conventions (names, semantics) follow verl's ``DataProto`` so code written for verl reads the
same here. Operations never mutate their inputs unless the docstring says so (``pop``,
``reorder``, ``union`` and ``__setitem__``-style updates of ``batch`` do).

Pickling (used by Ray) writes each tensor's own bytes only: views produced by slicing a large batch
are compacted first, so a 10-row slice of a 1000-row batch does not ship the 1000-row storage.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

logger = logging.getLogger(__name__)

__all__ = ["Batch", "BatchItem", "to_object_array", "union_numpy_dict", "union_tensor_dict"]

IndexLike = int | slice | Sequence[int] | np.ndarray | torch.Tensor


def to_object_array(values: Iterable[Any]) -> np.ndarray:
    """Return a 1-D ``dtype=object`` array with one element per item of ``values``.

    ``np.array(list_of_lists, dtype=object)`` would build a 2-D array when the inner lists have
    equal lengths; per-sample objects must stay opaque, so elements are assigned one by one.
    """
    if isinstance(values, np.ndarray) and values.dtype == object and values.ndim >= 1:
        return values
    items = list(values)
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr


def _objects_equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    try:
        eq = a == b
        return bool(eq)
    except Exception:  # objects whose == is ambiguous or raises are treated as different
        return False


def _object_arrays_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    return all(_objects_equal(x, y) for x, y in zip(a.reshape(-1), b.reshape(-1), strict=True))


def union_tensor_dict(td1: TensorDict, td2: TensorDict) -> TensorDict:
    """Merge ``td2`` into ``td1`` in place; equal keys must hold equal tensors (else ValueError)."""
    if td1.batch_size != td2.batch_size:
        raise ValueError(f"batch sizes differ: {td1.batch_size} vs {td2.batch_size}")
    for key in td2.keys():
        if key in td1.keys():
            a, b = td1[key], td2[key]
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b.to(a.device)):
                raise ValueError(f"tensor key {key!r} exists in both batches with different values")
        else:
            td1[key] = td2[key]
    return td1


def union_numpy_dict(d1: dict[str, np.ndarray], d2: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Merge ``d2`` into ``d1`` in place; equal keys must hold equal arrays (else ValueError)."""
    for key, val in d2.items():
        if key in d1:
            if not _object_arrays_equal(d1[key], val):
                raise ValueError(f"non-tensor key {key!r} exists in both batches with different values")
        else:
            d1[key] = val
    return d1


def _union_meta(m1: dict, m2: dict) -> dict:
    for key, val in m2.items():
        if key in m1 and not _objects_equal(m1[key], val):
            raise ValueError(f"meta_info key {key!r} exists in both batches with different values")
        m1.setdefault(key, val)
    return m1


def _normalize_index(idx: Any, length: int) -> slice | np.ndarray:
    """Turn a supported index into a slice or an int64 numpy index array (bool masks converted)."""
    if isinstance(idx, slice):
        return idx
    if isinstance(idx, torch.Tensor):
        idx = idx.detach().cpu().numpy()
    arr = np.asarray(idx)
    if arr.dtype == bool:
        if arr.shape != (length,):
            raise IndexError(f"boolean index of shape {arr.shape} does not match batch length {length}")
        return np.nonzero(arr)[0]
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"unsupported index dtype {arr.dtype}")
    if arr.ndim != 1:
        raise IndexError(f"index must be 1-D, got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.min() < -length or arr.max() >= length:
        raise IndexError(f"index out of range for batch of length {length}")
    return np.where(arr < 0, arr + length, arr)


@dataclass
class BatchItem:
    """One sample of a :class:`Batch` (``batch[i]`` with an int): tensors without the batch dim."""

    batch: TensorDict | None = None
    non_tensor_batch: dict[str, Any] = field(default_factory=dict)
    meta_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """Tensors + per-sample objects + meta info sharing the first dimension (see module doc)."""

    batch: TensorDict | None = None
    non_tensor_batch: dict[str, np.ndarray] = field(default_factory=dict)
    meta_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.non_tensor_batch = {k: to_object_array(v) for k, v in (self.non_tensor_batch or {}).items()}
        self.meta_info = dict(self.meta_info or {})
        self.check_consistency()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(
        cls,
        tensors: Mapping[str, torch.Tensor] | None = None,
        non_tensors: Mapping[str, Any] | None = None,
        meta_info: Mapping[str, Any] | None = None,
    ) -> Batch:
        """Build a batch; all tensors and non-tensor arrays must share the first dimension."""
        tensors = dict(tensors or {})
        non_tensor_batch = {k: to_object_array(v) for k, v in (non_tensors or {}).items()}
        td = None
        if tensors:
            for key, val in tensors.items():
                if not isinstance(val, torch.Tensor):
                    raise TypeError(f"tensor key {key!r} holds {type(val).__name__}, not a Tensor")
            sizes = {k: (v.shape[0] if v.dim() > 0 else None) for k, v in tensors.items()}
            distinct = set(sizes.values())
            if None in distinct or len(distinct) != 1:
                raise ValueError(f"tensors do not share a first dimension: {sizes}")
            td = TensorDict(tensors, batch_size=[distinct.pop()])
        return cls(batch=td, non_tensor_batch=non_tensor_batch, meta_info=dict(meta_info or {}))

    @classmethod
    def from_single_dict(cls, data: Mapping[str, Any], meta_info: Mapping[str, Any] | None = None) -> Batch:
        """Split ``data`` into tensors (``torch.Tensor`` values) and per-sample objects (the rest)."""
        tensors, non_tensors = {}, {}
        for key, val in data.items():
            if isinstance(val, torch.Tensor):
                tensors[key] = val
            else:
                non_tensors[key] = val
        return cls.from_dict(tensors, non_tensors, meta_info)

    # ------------------------------------------------------------------ basics
    def check_consistency(self) -> None:
        if self.batch is not None and len(self.batch.batch_size) != 1:
            raise ValueError(f"batch must have exactly one batch dimension, got {self.batch.batch_size}")
        lengths = {f"non_tensor_batch[{k!r}]": len(v) for k, v in self.non_tensor_batch.items()}
        if self.batch is not None:
            lengths["batch"] = self.batch.batch_size[0]
        if len(set(lengths.values())) > 1:
            raise ValueError(f"inconsistent batch lengths: {lengths}")
        for key, val in self.non_tensor_batch.items():
            if not isinstance(val, np.ndarray) or val.dtype != object:
                raise TypeError(f"non_tensor_batch[{key!r}] must be a numpy object array")

    def __len__(self) -> int:
        if self.batch is not None:
            return int(self.batch.batch_size[0])
        for val in self.non_tensor_batch.values():
            return len(val)
        return 0

    @property
    def tensor_keys(self) -> list[str]:
        return list(self.batch.keys()) if self.batch is not None else []

    def __contains__(self, key: str) -> bool:
        return key in self.tensor_keys or key in self.non_tensor_batch

    def __getitem__(self, idx: IndexLike) -> Batch | BatchItem:
        """``b[i]`` -> :class:`BatchItem`; a slice, int list/array/tensor or bool mask -> Batch."""
        if isinstance(idx, (int, np.integer)) or (isinstance(idx, torch.Tensor) and idx.dim() == 0
                                                  and not idx.dtype.is_floating_point
                                                  and idx.dtype != torch.bool):
            i = int(idx)
            n = len(self)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for batch of length {n}")
            td = self.batch[i] if self.batch is not None else None
            return BatchItem(td, {k: v[i] for k, v in self.non_tensor_batch.items()}, self.meta_info)
        return self._take(_normalize_index(idx, len(self)))

    def _take(self, index: slice | np.ndarray) -> Batch:
        if isinstance(index, slice):
            td = self.batch[index] if self.batch is not None else None
            non_tensor = {k: v[index] for k, v in self.non_tensor_batch.items()}
        else:
            td = None
            if self.batch is not None:
                tindex = torch.from_numpy(index).to(self.batch.device or "cpu")
                td = self.batch[tindex]
            non_tensor = {k: v[index] for k, v in self.non_tensor_batch.items()}
        return Batch(td, non_tensor, dict(self.meta_info))

    def __iter__(self) -> Iterator[BatchItem]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        tensors = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in self.batch.items()} \
            if self.batch is not None else {}
        return (f"Batch(len={len(self)}, tensors={tensors}, non_tensors={list(self.non_tensor_batch)}, "
                f"meta_info={list(self.meta_info)})")

    def nbytes(self) -> int:
        """Bytes held by the tensors (the part that dominates transfers)."""
        if self.batch is None:
            return 0
        return sum(v.numel() * v.element_size() for v in self.batch.values())

    # ------------------------------------------------------------------ key selection
    def select(
        self,
        batch_keys: Sequence[str] | None = None,
        non_tensor_batch_keys: Sequence[str] | None = None,
        meta_info_keys: Sequence[str] | None = None,
        deepcopy: bool = False,
    ) -> Batch:
        """A new batch with only the given keys (``None`` keeps all of that kind).

        Tensors are shared with ``self`` (no copy); ``deepcopy=True`` copies non-tensors and meta.
        """
        td = self.batch
        if td is not None and batch_keys is not None:
            missing = [k for k in batch_keys if k not in td.keys()]
            if missing:
                raise KeyError(f"tensor keys not in batch: {missing}")
            td = td.select(*batch_keys)
        elif td is not None:
            td = td.select(*td.keys())
        if non_tensor_batch_keys is not None:
            missing = [k for k in non_tensor_batch_keys if k not in self.non_tensor_batch]
            if missing:
                raise KeyError(f"non-tensor keys not in batch: {missing}")
            non_tensor = {k: self.non_tensor_batch[k] for k in non_tensor_batch_keys}
        else:
            non_tensor = dict(self.non_tensor_batch)
        if meta_info_keys is not None:
            missing = [k for k in meta_info_keys if k not in self.meta_info]
            if missing:
                raise KeyError(f"meta_info keys not in batch: {missing}")
            meta = {k: self.meta_info[k] for k in meta_info_keys}
        else:
            meta = dict(self.meta_info)
        if deepcopy:
            non_tensor = copy.deepcopy(non_tensor)
            meta = copy.deepcopy(meta)
        return Batch(td, non_tensor, meta)

    def pop(
        self,
        batch_keys: Sequence[str] | None = None,
        non_tensor_batch_keys: Sequence[str] | None = None,
        meta_info_keys: Sequence[str] | None = None,
    ) -> Batch:
        """Remove the given keys from ``self`` (in place) and return them as a new batch.

        Unlike ``select``, ``None`` means "none of that kind".
        """
        batch_keys = list(batch_keys or [])
        non_tensor_batch_keys = list(non_tensor_batch_keys or [])
        meta_info_keys = list(meta_info_keys or [])
        for key in batch_keys:
            if key not in self.tensor_keys:
                raise KeyError(f"tensor key {key!r} not in batch")
        for key in non_tensor_batch_keys:
            if key not in self.non_tensor_batch:
                raise KeyError(f"non-tensor key {key!r} not in batch")
        for key in meta_info_keys:
            if key not in self.meta_info:
                raise KeyError(f"meta_info key {key!r} not in batch")
        td = None
        if batch_keys:
            td = TensorDict({k: self.batch.pop(k) for k in batch_keys}, batch_size=self.batch.batch_size)
        non_tensor = {k: self.non_tensor_batch.pop(k) for k in non_tensor_batch_keys}
        meta = {k: self.meta_info.pop(k) for k in meta_info_keys}
        return Batch(td, non_tensor, meta)

    def union(self, other: Batch) -> Batch:
        """Merge ``other`` into ``self`` in place and return ``self``.

        Keys present in both must hold equal values; a conflict raises ``ValueError``.
        """
        if len(self) != len(other) and (self.tensor_keys or self.non_tensor_batch) \
                and (other.tensor_keys or other.non_tensor_batch):
            raise ValueError(f"cannot union batches of length {len(self)} and {len(other)}")
        if other.batch is not None:
            if self.batch is None:
                self.batch = other.batch.select(*other.batch.keys())
            else:
                union_tensor_dict(self.batch, other.batch)
        union_numpy_dict(self.non_tensor_batch, other.non_tensor_batch)
        _union_meta(self.meta_info, other.meta_info)
        self.check_consistency()
        return self

    # ------------------------------------------------------------------ splitting / joining
    def chunk(self, chunks: int) -> list[Batch]:
        """Split into ``chunks`` equal parts; ``len(self)`` must be divisible (see pad_to_divisor)."""
        if chunks <= 0:
            raise ValueError(f"chunks must be positive, got {chunks}")
        n = len(self)
        if n % chunks != 0:
            raise ValueError(f"batch of length {n} is not divisible into {chunks} chunks; "
                             "use pad_to_divisor first")
        size = n // chunks
        return [self[i * size:(i + 1) * size] for i in range(chunks)]

    def split(self, split_size: int) -> list[Batch]:
        """Consecutive parts of ``split_size`` rows (the last one may be shorter)."""
        if split_size <= 0:
            raise ValueError(f"split_size must be positive, got {split_size}")
        return [self[i:i + split_size] for i in range(0, len(self), split_size)]

    def pad_to_divisor(self, divisor: int) -> tuple[Batch, int]:
        """Append rows (copies of the first rows, cycling) until ``len % divisor == 0``.

        Returns ``(padded_batch, pad_size)``; undo with ``padded.unpad(pad_size)``.
        """
        if divisor <= 0:
            raise ValueError(f"divisor must be positive, got {divisor}")
        n = len(self)
        pad_size = (-n) % divisor
        if pad_size == 0:
            return self, 0
        if n == 0:
            raise ValueError("cannot pad an empty batch")
        pad_idx = np.arange(pad_size) % n
        return Batch.concat([self, self._take(pad_idx)]), pad_size

    def unpad(self, pad_size: int) -> Batch:
        """Drop the last ``pad_size`` rows added by :meth:`pad_to_divisor`."""
        if pad_size < 0 or pad_size > len(self):
            raise ValueError(f"invalid pad_size {pad_size} for batch of length {len(self)}")
        return self if pad_size == 0 else self[:len(self) - pad_size]

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """Concatenate along the batch dim; meta_info comes from the first batch (others must agree)."""
        batches = list(batches)
        if not batches:
            raise ValueError("concat needs at least one batch")
        keys = [set(b.tensor_keys) for b in batches]
        nt_keys = [set(b.non_tensor_batch) for b in batches]
        if any(k != keys[0] for k in keys) or any(k != nt_keys[0] for k in nt_keys):
            raise ValueError("all batches must have the same tensor and non-tensor keys")
        td = None
        if batches[0].batch is not None:
            td = TensorDict(
                {k: torch.cat([b.batch[k] for b in batches], dim=0) for k in batches[0].tensor_keys},
                batch_size=[sum(len(b) for b in batches)],
            )
        non_tensor = {k: np.concatenate([b.non_tensor_batch[k] for b in batches], axis=0)
                      for k in batches[0].non_tensor_batch}
        meta = dict(batches[0].meta_info)
        for b in batches[1:]:
            for key, val in b.meta_info.items():
                if key in meta and not _objects_equal(meta[key], val):
                    logger.debug("concat: meta_info[%r] differs between batches; keeping the first", key)
                meta.setdefault(key, val)
        return Batch(td, non_tensor, meta)

    def repeat(self, repeat_times: int = 2, interleave: bool = True) -> Batch:
        """Repeat every row ``repeat_times`` times.

        ``interleave=True`` gives ``a a b b`` (n samples per prompt stay adjacent);
        ``interleave=False`` gives ``a b a b``.
        """
        if repeat_times < 1:
            raise ValueError(f"repeat_times must be >= 1, got {repeat_times}")
        n = len(self)
        if interleave:
            index = np.repeat(np.arange(n), repeat_times)
        else:
            index = np.tile(np.arange(n), repeat_times)
        return self._take(index)

    def reorder(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> Batch:
        """Permute rows in place (``self = self[indices]``) and return ``self``."""
        index = _normalize_index(indices, len(self))
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        if len(index) != len(self):
            raise ValueError(f"reorder needs {len(self)} indices, got {len(index)}")
        taken = self._take(index)
        self.batch, self.non_tensor_batch = taken.batch, taken.non_tensor_batch
        return self

    def shuffle(self, seed: int | None = None) -> Batch:
        """A new batch with rows in a random order (``torch.Generator`` seeded by ``seed``)."""
        gen = torch.Generator()
        if seed is not None:
            gen.manual_seed(seed)
        perm = torch.randperm(len(self), generator=gen).numpy()
        return self._take(perm)

    def to(self, device: str | torch.device) -> Batch:
        """Move tensors to ``device`` in place and return ``self``."""
        if self.batch is not None:
            self.batch = self.batch.to(device)
        return self

    def clone(self) -> Batch:
        td = self.batch.clone() if self.batch is not None else None
        return Batch(td, copy.deepcopy(self.non_tensor_batch), copy.deepcopy(self.meta_info))

    # ------------------------------------------------------------------ pickling (Ray)
    def __getstate__(self) -> dict[str, Any]:
        tensors = None
        batch_size = None
        device = None
        if self.batch is not None:
            batch_size = list(self.batch.batch_size)
            device = self.batch.device
            tensors = {}
            for key, val in self.batch.items():
                # A view pickles its whole storage; copy out just the visible elements when the
                # storage is larger than the tensor, so slices ship only their own bytes.
                if val.untyped_storage().nbytes() > val.numel() * val.element_size() or not val.is_contiguous():
                    val = val.contiguous().clone()
                tensors[key] = val
        return {
            "tensors": tensors,
            "batch_size": batch_size,
            "device": None if device is None else str(device),
            "non_tensor_batch": self.non_tensor_batch,
            "meta_info": self.meta_info,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        td = None
        if state["tensors"] is not None:
            td = TensorDict(state["tensors"], batch_size=state["batch_size"], device=state.get("device"))
        self.batch = td
        self.non_tensor_batch = state["non_tensor_batch"]
        self.meta_info = state["meta_info"]
