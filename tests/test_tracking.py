"""Experiment tracking: secrets redacted, console line, JSONL, tensorboard, wandb offline."""

import json
import os

import numpy as np
import pytest
import torch

from deepretrieval.trainer.tracking import ConsoleBackend, Tracking, redact_secrets, to_scalars, wandb_has_api_key

CONFIG = {
    "reward": {"sources": {"pubmed": {"engine": "pubmed", "api_key": "NCBI-SECRET", "k": 3000}}},
    "trainer": {"project_name": "p", "logger": ["jsonl"]},
    "auth": {"user": "alice", "pass": "pw-SECRET"},
    "hf_token": "hf_SECRET",
    "actor_rollout_ref": {"rollout": {"max_num_batched_tokens": 8192}},
    "data": {"tokenizer": "Qwen/Qwen2.5-3B-Instruct"},
}


def test_redact_secrets_keeps_structure_and_harmless_keys():
    red = redact_secrets(CONFIG)
    assert red["reward"]["sources"]["pubmed"] == {"engine": "pubmed", "api_key": "***", "k": 3000}
    assert red["auth"] == {"user": "***", "pass": "***"}
    assert red["hf_token"] == "***"
    assert red["actor_rollout_ref"]["rollout"]["max_num_batched_tokens"] == 8192
    assert red["data"]["tokenizer"] == "Qwen/Qwen2.5-3B-Instruct"
    assert CONFIG["hf_token"] == "hf_SECRET"  # the input is not modified


def test_to_scalars_averages_tensors_and_drops_text():
    out = to_scalars({"a": torch.tensor([1.0, 3.0]), "b": np.float32(2.5), "c": "text", "d": True, "e": 4})
    assert out == {"a": 2.0, "b": 2.5, "d": 1.0, "e": 4.0}


def test_console_line_shows_headline_metrics():
    line = ConsoleBackend(write=lambda s: None).format(
        {"critic/score/mean": 1.23456, "actor/pg_loss": 1e-7, "val/pubmed_mini/recall_mean": 0.5,
         "val/pubmed_mini/format_error_ratio": 0.1, "timing_s/step": 2.0}, step=7)
    assert line == "step 7 | score 1.235 | pg_loss 1.000e-07 | step_s 2 | val/pubmed_mini/recall_mean 0.5"


def test_jsonl_tensorboard_and_no_secret_on_disk(tmp_path):
    lines = []
    tr = Tracking("proj", "exp", ["console", "jsonl", "tensorboard"], config=CONFIG, log_dir=str(tmp_path),
                  console_write=lines.append)
    tr.log({"critic/score/mean": 1.0, "timing/gen": 0.5}, step=1)
    tr.log({"critic/score/mean": 2.0, "bad": float("nan")}, step=2)
    tr.finish()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 1, "critic/score/mean": 1.0, "timing/gen": 0.5},
                    {"step": 2, "critic/score/mean": 2.0, "bad": None}]
    assert lines[0].startswith("step 1 | score 1")
    events = [f for f in os.listdir(tmp_path / "tensorboard") if f.startswith("events.out")]
    assert events
    on_disk = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"SECRET" not in on_disk
    assert b"***" in (tmp_path / "config.json").read_bytes()


def test_unknown_backend_and_failing_backend(tmp_path):
    with pytest.raises(ValueError, match="mlflow"):
        Tracking("p", "e", ["mlflow"], log_dir=str(tmp_path))

    def broken(_):
        raise OSError("disk full")

    tr = Tracking("p", "e", ["console", "jsonl"], log_dir=str(tmp_path), console_write=broken)
    tr.log({"x": 1.0}, step=1)  # the console fails; the run and the other backend go on
    tr.finish()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "x": 1.0}


def test_wandb_offline_without_api_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc either
    assert not wandb_has_api_key()
    tr = Tracking("proj", "exp", ["wandb"], config=CONFIG, log_dir=str(tmp_path / "logs"))
    try:
        assert tr.backends["wandb"].run.settings.mode == "offline"
        tr.log({"critic/score/mean": 1.0}, step=1)
    finally:
        tr.finish()
    run_dirs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert run_dirs
    on_disk = b"".join(p.read_bytes() for p in run_dirs[0].rglob("*") if p.is_file())
    assert b"SECRET" not in on_disk and b"NCBI" not in on_disk
