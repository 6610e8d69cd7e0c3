"""Batch: construction, indexing, key selection, union, chunk/pad, concat, repeat, reorder, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from deepretrieval.protocol import Batch, BatchItem, to_object_array


def make_batch(n: int = 4) -> Batch:
    return Batch.from_dict(
        tensors={"input_ids": torch.arange(n * 3).view(n, 3), "score": torch.arange(n, dtype=torch.float32)},
        non_tensors={"uid": [f"u{i}" for i in range(n)], "gt": [[i, i + 1] for i in range(n)]},
        meta_info={"temperature": 1.0},
    )


def test_from_dict_and_from_single_dict():
    b = make_batch()
    assert len(b) == 4
    assert b.tensor_keys == ["input_ids", "score"]
    # equal-length inner lists must stay opaque objects, not become a 2-D array
    assert b.non_tensor_batch["gt"].shape == (4,) and b.non_tensor_batch["gt"][2] == [2, 3]
    s = Batch.from_single_dict({"x": torch.zeros(2, 5), "uid": np.array(["a", "b"], dtype=object),
                                "extra": [{"k": 1}, {"k": 2}]}, meta_info={"validate": True})
    assert s.tensor_keys == ["x"] and set(s.non_tensor_batch) == {"uid", "extra"}
    assert s.meta_info == {"validate": True} and "x" in s and "extra" in s and "y" not in s
    only_objects = Batch.from_dict(non_tensors={"a": [1, 2, 3]})
    assert only_objects.batch is None and len(only_objects) == 3


def test_inconsistent_lengths_raise():
    with pytest.raises(ValueError):
        Batch.from_dict({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)})
    with pytest.raises(ValueError):
        Batch.from_dict({"a": torch.zeros(3, 2)}, {"uid": ["x", "y"]})
    with pytest.raises(TypeError):
        Batch.from_dict({"a": [1, 2, 3]})


def test_indexing_variants():
    b = make_batch(5)
    item = b[1]
    assert isinstance(item, BatchItem)
    assert item.batch["input_ids"].tolist() == [3, 4, 5] and item.non_tensor_batch["uid"] == "u1"
    assert b[-1].non_tensor_batch["uid"] == "u4"
    with pytest.raises(IndexError):
        b[5]
    assert b[1:3].non_tensor_batch["uid"].tolist() == ["u1", "u2"]
    assert b[[4, 0]].batch["score"].tolist() == [4.0, 0.0]
    assert b[np.array([3, 3])].non_tensor_batch["uid"].tolist() == ["u3", "u3"]
    assert b[torch.tensor([2])].batch["input_ids"].tolist() == [[6, 7, 8]]
    mask = torch.tensor([True, False, True, False, False])
    picked = b[mask]
    assert picked.non_tensor_batch["uid"].tolist() == ["u0", "u2"] and picked.batch["score"].tolist() == [0.0, 2.0]
    assert len(b[[]]) == 0
    with pytest.raises(IndexError):
        b[[7]]
    with pytest.raises(IndexError):
        b[torch.tensor([True, False])]
    assert [it.non_tensor_batch["uid"] for it in b] == [f"u{i}" for i in range(5)]


def test_select_and_pop():
    b = make_batch()
    sel = b.select(batch_keys=["score"], non_tensor_batch_keys=["uid"])
    assert sel.tensor_keys == ["score"] and list(sel.non_tensor_batch) == ["uid"]
    assert sel.meta_info == {"temperature": 1.0}
    assert b.tensor_keys == ["input_ids", "score"]  # select does not mutate
    with pytest.raises(KeyError):
        b.select(batch_keys=["missing"])
    popped = b.pop(batch_keys=["input_ids"], non_tensor_batch_keys=["gt"], meta_info_keys=["temperature"])
    assert popped.tensor_keys == ["input_ids"] and list(popped.non_tensor_batch) == ["gt"]
    assert popped.meta_info == {"temperature": 1.0}
    assert b.tensor_keys == ["score"] and list(b.non_tensor_batch) == ["uid"] and b.meta_info == {}
    with pytest.raises(KeyError):
        b.pop(batch_keys=["input_ids"])


def test_union_merges_and_rejects_conflicts():
    b = make_batch()
    other = Batch.from_dict({"score": torch.arange(4, dtype=torch.float32), "values": torch.ones(4, 3)},
                            {"uid": [f"u{i}" for i in range(4)], "new": list("abcd")}, {"step": 3})
    b.union(other)
    assert set(b.tensor_keys) == {"input_ids", "score", "values"}
    assert set(b.non_tensor_batch) == {"uid", "gt", "new"} and b.meta_info["step"] == 3
    with pytest.raises(ValueError, match="score"):
        b.union(Batch.from_dict({"score": torch.zeros(4)}))
    with pytest.raises(ValueError, match="uid"):
        b.union(Batch.from_dict(non_tensors={"uid": list("wxyz")}))
    with pytest.raises(ValueError, match="temperature"):
        b.union(Batch(meta_info={"temperature": 0.5}))
    with pytest.raises(ValueError):
        b.union(make_batch(3))


def test_chunk_pad_unpad_split():
    b = make_batch(6)
    chunks = b.chunk(3)
    assert [c.non_tensor_batch["uid"].tolist() for c in chunks] == [["u0", "u1"], ["u2", "u3"], ["u4", "u5"]]
    with pytest.raises(ValueError, match="divisible"):
        b.chunk(4)
    padded, pad = b.pad_to_divisor(4)
    assert pad == 2 and len(padded) == 8
    assert padded.non_tensor_batch["uid"].tolist()[-2:] == ["u0", "u1"]
    assert len(padded.chunk(4)) == 4
    restored = padded.unpad(pad)
    assert torch.equal(restored.batch["input_ids"], b.batch["input_ids"])
    same, zero = b.pad_to_divisor(3)
    assert zero == 0 and same is b
    small, pad = make_batch(1).pad_to_divisor(4)  # padding longer than the batch cycles rows
    assert pad == 3 and small.non_tensor_batch["uid"].tolist() == ["u0"] * 4
    assert [len(p) for p in b.split(4)] == [4, 2]


def test_concat_roundtrip_and_key_mismatch():
    b = make_batch(6)
    parts = [b[0:2], b[2:3], b[3:6]]
    joined = Batch.concat(parts)
    assert torch.equal(joined.batch["input_ids"], b.batch["input_ids"])
    assert joined.non_tensor_batch["gt"].tolist() == b.non_tensor_batch["gt"].tolist()
    assert joined.meta_info == b.meta_info
    with pytest.raises(ValueError):
        Batch.concat([b, b.select(batch_keys=["score"])])
    with pytest.raises(ValueError):
        Batch.concat([])


def test_repeat_interleaved_and_tiled():
    b = make_batch(2)
    r = b.repeat(3, interleave=True)
    assert r.non_tensor_batch["uid"].tolist() == ["u0", "u0", "u0", "u1", "u1", "u1"]
    assert r.batch["score"].tolist() == [0, 0, 0, 1, 1, 1]
    t = b.repeat(2, interleave=False)
    assert t.non_tensor_batch["uid"].tolist() == ["u0", "u1", "u0", "u1"]
    assert t.batch["input_ids"][2].tolist() == [0, 1, 2]
    # per-sample objects are shared references after repeat; that is what verl does too
    assert r.non_tensor_batch["gt"][0] == [0, 1]


def test_reorder_in_place_and_shuffle():
    b = make_batch(4)
    out = b.reorder(torch.tensor([3, 1, 2, 0]))
    assert out is b
    assert b.non_tensor_batch["uid"].tolist() == ["u3", "u1", "u2", "u0"]
    assert b.batch["score"].tolist() == [3, 1, 2, 0]
    with pytest.raises(ValueError):
        b.reorder([0, 1])
    s1, s2 = b.shuffle(seed=7), b.shuffle(seed=7)
    assert s1.non_tensor_batch["uid"].tolist() == s2.non_tensor_batch["uid"].tolist()
    assert sorted(s1.non_tensor_batch["uid"].tolist()) == ["u0", "u1", "u2", "u3"]
    # rows stay aligned across tensors and objects
    for i in range(4):
        assert s1.non_tensor_batch["uid"][i] == f"u{int(s1.batch['score'][i])}"


def test_to_clone():
    b = make_batch()
    assert b.to("cpu") is b and b.batch.device.type == "cpu"
    c = b.clone()
    c.batch["score"][0] = 99
    c.non_tensor_batch["gt"][0].append(5)
    assert b.batch["score"][0] == 0 and b.non_tensor_batch["gt"][0] == [0, 1]


def test_to_object_array_is_one_dimensional():
    arr = to_object_array([(1, 2), (3, 4)])
    assert arr.shape == (2,) and arr[1] == (3, 4)


def test_pickle_roundtrip_is_cheap():
    n, length = 1000, 512
    gen = torch.Generator().manual_seed(0)
    b = Batch.from_dict(
        {"input_ids": torch.randint(0, 32000, (n, length), generator=gen),
         "log_probs": torch.randn(n, length, generator=gen)},
        {"uid": [f"id{i}" for i in range(n)]},
        {"temperature": 0.7},
    )
    blob = pickle.dumps(b)
    raw = b.nbytes()
    assert raw == n * length * (8 + 4)
    # tensor bytes plus ~10 bytes per uid string and a few KB of framing
    assert len(blob) < raw * 1.01 + 20 * n
    back = pickle.loads(blob)
    assert torch.equal(back.batch["input_ids"], b.batch["input_ids"])
    assert torch.equal(back.batch["log_probs"], b.batch["log_probs"])
    assert back.non_tensor_batch["uid"].tolist() == b.non_tensor_batch["uid"].tolist()
    assert back.meta_info == {"temperature": 0.7} and len(back) == n

    # a slice is a view of the big storage; it must not ship the whole storage
    part = b[:10]
    part_blob = pickle.dumps(part)
    assert len(part_blob) < 10 * length * 12 * 1.1 + 20_000
    assert torch.equal(pickle.loads(part_blob).batch["input_ids"], b.batch["input_ids"][:10])
    # transposed (non-contiguous) tensors survive too
    nc = Batch.from_dict({"t": torch.arange(12).view(3, 4).t()})
    assert torch.equal(pickle.loads(pickle.dumps(nc)).batch["t"], torch.arange(12).view(3, 4).t())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_operations():
    b = make_batch(4).to("cuda")
    assert b.batch["input_ids"].is_cuda
    sub = b[[3, 1]]
    assert sub.batch["input_ids"].is_cuda and sub.batch["score"].tolist() == [3.0, 1.0]
    assert Batch.concat(b.chunk(2)).batch["score"].is_cuda
    back = pickle.loads(pickle.dumps(b)).to("cpu")
    assert torch.equal(back.batch["input_ids"], make_batch(4).batch["input_ids"])
