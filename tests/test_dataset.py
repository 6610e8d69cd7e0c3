"""RLHFDataset: chat template + assistant prefix, left padding, truncation, collate -> Batch."""

import numpy as np
import pytest
import torch

from deepretrieval.data import tasks
from deepretrieval.data.dataset import RLHFDataset, collate_fn, compute_position_ids
from deepretrieval.data.prompts import render_raw_text


@pytest.fixture(scope="module")
def tokenizer():
    from deepretrieval.models.tiny import load_tiny_tokenizer

    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    out = tmp_path_factory.mktemp("trials")
    return tasks.prepare_task("trials_sigir", out, val_size=4)


def test_item_is_chat_template_plus_prefix_left_padded(tokenizer, parquet):
    ds = RLHFDataset(str(parquet["val"]), tokenizer, {"data": {"max_prompt_length": 1024}})
    assert len(ds) == 4
    item = ds[1]
    row = ds.rows[1]
    expected_text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    expected_text += "Let me solve this step by step.\n<think>\n"
    assert item["raw_prompt_text"] == expected_text
    ids = tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    n, pad = len(ids), 1024 - len(ids)
    assert item["input_ids"].shape == (1024,)
    assert item["input_ids"][pad:].tolist() == ids
    assert (item["input_ids"][:pad] == tokenizer.pad_token_id).all()
    assert item["attention_mask"].tolist() == [0] * pad + [1] * n
    assert item["position_ids"].tolist() == [0] * pad + list(range(n))
    assert item["data_source"] == "trials_sigir" and item["index"] == 1
    assert isinstance(item["reward_model"]["ground_truth"]["target"], list)  # numpy arrays converted
    assert item["raw_prompt"] == row["prompt"]


def test_position_ids_formula():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert compute_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_raw_text_for_base_models(tokenizer, parquet):
    ds = RLHFDataset(str(parquet["val"]), tokenizer, {"max_prompt_length": 1024, "apply_chat_template": False})
    item = ds[0]
    assert item["raw_prompt_text"] == render_raw_text(ds.rows[0]["prompt"], ds.rows[0]["extra_info"]["assistant_prefix"])
    assert "<|im_start|>" not in item["raw_prompt_text"]
    override = RLHFDataset(str(parquet["val"]), tokenizer, {"max_prompt_length": 1024, "assistant_prefix": ""})
    assert override[0]["raw_prompt_text"].endswith("<|im_start|>assistant\n")


def test_truncation_modes(tokenizer, parquet):
    full = RLHFDataset(str(parquet["val"]), tokenizer, {"max_prompt_length": 2048})[0]
    ids = full["input_ids"][full["attention_mask"].bool()].tolist()
    with pytest.raises(ValueError, match="max_prompt_length"):
        RLHFDataset(str(parquet["val"]), tokenizer, {"max_prompt_length": 64})[0]
    left = RLHFDataset(str(parquet["val"]), tokenizer, {"max_prompt_length": 64, "truncation": "left"})[0]
    right = RLHFDataset(str(parquet["val"]), tokenizer, {"max_prompt_length": 64, "truncation": "right"})[0]
    assert left["input_ids"].tolist() == ids[-64:] and right["input_ids"].tolist() == ids[:64]
    assert left["attention_mask"].all() and left["position_ids"].tolist() == list(range(64))
    with pytest.raises(ValueError):
        RLHFDataset(str(parquet["val"]), tokenizer, {"truncation": "middle"})


def test_filter_overlong_prompts(tokenizer, parquet):
    lengths = []
    base = RLHFDataset(str(parquet["train"]), tokenizer, {"max_prompt_length": 4096})
    for i in range(len(base)):
        lengths.append(int(base[i]["attention_mask"].sum()))
    limit = sorted(lengths)[len(lengths) // 2]
    kept = RLHFDataset(
        str(parquet["train"]), tokenizer, {"max_prompt_length": limit, "filter_overlong_prompts": True}
    )
    assert len(kept) == sum(n <= limit for n in lengths)
    kept[len(kept) - 1]  # no error: every kept prompt fits


def test_multiple_files_and_collate_to_batch(tokenizer, parquet):
    from deepretrieval.protocol import Batch

    ds = RLHFDataset([str(parquet["val"]), str(parquet["test"])], tokenizer, {"max_prompt_length": 1024})
    assert len(ds) == 4 + 12
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn, shuffle=False)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (3, 1024)
    assert batch["data_source"].dtype == object and batch["data_source"].shape == (3,)
    assert batch["raw_prompt"].shape == (3,) and isinstance(batch["raw_prompt"][0], list)
    b = Batch.from_single_dict(batch)
    assert len(b) == 3 and "input_ids" in b.batch.keys()
    assert list(b.non_tensor_batch["index"]) == [0, 1, 2]
    assert isinstance(b.non_tensor_batch["reward_model"][0], dict)
    assert np.array_equal(b.non_tensor_batch["data_source"], np.array(["trials_sigir"] * 3, dtype=object))
