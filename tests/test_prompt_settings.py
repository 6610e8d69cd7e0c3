"""A checkpoint remembers how it was prompted (trainer.checkpoint: prompt.json), and evaluation
prompts it that way, or refuses a conflicting explicit style with a clear message. Train-free:
the checkpoint folder is written by hand around the tiny model."""

import json
import logging
import sys
from types import SimpleNamespace

import pytest

from deepretrieval.data.dataset import DEFAULTS
from deepretrieval.data.prompts import COMPACT_INSTRUCTION, ENGINE_SYNTAX
from deepretrieval.data.tasks import build_splits
from deepretrieval.eval.methods import ModelMethod
from deepretrieval.eval.runner import evaluate
from deepretrieval.eval.samples import load_samples, sample_from_row
from deepretrieval.eval.searcher import Searcher
from deepretrieval.rewards.parsing import format_answer
from deepretrieval.search.base import SearchEngine, SearchResult
from deepretrieval.trainer.checkpoint import (
    HF_EXPORT_DIR,
    PROMPT_FILE,
    IncompleteCheckpoint,
    choose_prompt_style,
    prompt_settings,
    read_prompt_settings,
    save_prompt_settings,
)


def test_settings_from_training_rows():
    compact = build_splits("pubmed_mini", style="compact")["train"]
    settings = prompt_settings(compact, dict(DEFAULTS, max_prompt_length=128, truncation="left"))
    assert settings == {"version": 1, "prompt_style": "compact", "prompt_styles": ["compact"],
                        "data_sources": ["pubmed_mini"], "prompt_key": "prompt", "apply_chat_template": True,
                        "assistant_prefix": None, "max_prompt_length": 128, "truncation": "left"}
    mixed = compact[:2] + build_splits("trials_sigir", style="reasoning")["train"][:1]
    settings = prompt_settings(mixed, DEFAULTS)
    assert settings["prompt_style"] is None and settings["prompt_styles"] == ["compact", "reasoning"]
    assert settings["data_sources"] == ["pubmed_mini", "trials_sigir"]
    # rows of the original preprocessing have no extra_info style: the dataset marks them `original`
    raw = {"data_source": "literature", "ability": "literature_mining", "prompt": [{"role": "user", "content": "x"}]}
    assert prompt_settings([raw], DEFAULTS)["prompt_style"] == "original"


def test_choose_prompt_style():
    trained = {"prompt_style": "compact", "prompt_styles": ["compact"]}
    assert choose_prompt_style(trained) == "compact"
    assert choose_prompt_style(trained, "compact") == "compact"
    assert choose_prompt_style(None) is None and choose_prompt_style({}) is None  # rows as prepared
    assert choose_prompt_style(None, "no_reason") == "no_reason"
    with pytest.raises(ValueError, match=r"trained with prompt style 'compact' \(prompt.json\), not 'reasoning'"):
        choose_prompt_style(trained, "reasoning", model="ckpt")
    assert choose_prompt_style(trained, "reasoning", force=True) == "reasoning"
    mixed = {"prompt_style": None, "prompt_styles": ["compact", "reasoning"]}
    with pytest.raises(ValueError, match="several styles"):
        choose_prompt_style(mixed)
    assert choose_prompt_style(mixed, "reasoning") == "reasoning"


def test_read_write_and_damaged_file(tmp_path):
    assert read_prompt_settings(tmp_path) is None
    (tmp_path / PROMPT_FILE).write_text("{torn")
    with pytest.raises(IncompleteCheckpoint, match="unreadable"):
        read_prompt_settings(tmp_path)
    (tmp_path / PROMPT_FILE).write_text("[1]")
    with pytest.raises(IncompleteCheckpoint, match="JSON object"):
        read_prompt_settings(tmp_path)


class _NoHits(SearchEngine):
    name = "no_hits"

    def search(self, query, k=100, **filters):
        return SearchResult(ids=[], total=0, query=query, engine=self.name, k=k)


class _RecordingVLLM:
    """Stands in for the vllm module (not installed here): keeps the prompts it is sent and answers
    each with `answer`."""

    def __init__(self, answer):
        self.answer, self.prompts = answer, []

    def LLM(self, model, seed=0):  # noqa: N802  (vllm's class name)
        return self

    def SamplingParams(self, **params):  # noqa: N802
        return params

    def generate(self, prompts, params):
        self.prompts.extend(prompts)
        return [SimpleNamespace(outputs=[SimpleNamespace(text=self.answer)] * params["n"]) for _ in prompts]


@pytest.fixture()
def compact_checkpoint(tmp_path):
    """A trainer checkpoint root whose step holds the tiny model as its HF export and the prompt
    settings of the quickstart's compact training rows."""
    from deepretrieval.models.tiny import save_tiny_model

    step = tmp_path / "checkpoints" / "global_step_16"
    save_tiny_model(step / HF_EXPORT_DIR)
    rows = build_splits("pubmed_mini", style="compact")["train"]
    save_prompt_settings(step, SimpleNamespace(rows=rows, config=dict(DEFAULTS, max_prompt_length=128)))
    assert json.loads((step / HF_EXPORT_DIR / PROMPT_FILE).read_text())["prompt_style"] == "compact"
    return step


def test_eval_prompts_a_checkpoint_as_it_was_trained(compact_checkpoint, tmp_path, monkeypatch):
    fake = _RecordingVLLM(format_answer("skeletal muscle relaxants"))  # the compact format: no <think>
    monkeypatch.setitem(sys.modules, "vllm", fake)
    samples = load_samples("pubmed_mini", split="test")  # the task's own rows: the full reasoning prompt
    assert samples[0].extra_info["prompt_style"] == "reasoning"
    searcher = Searcher(k=10, cache=False, engines={"pubmed_mini": _NoHits()})

    method = ModelMethod(compact_checkpoint, name="trained", backend="vllm", max_new_tokens=8)
    assert method.prompt_style == "compact" and method.spec()["prompt_style"] == "compact"
    records = evaluate(samples, method, tmp_path / "out", searcher=searcher, progress=False)
    assert len(fake.prompts) == len(samples) == 7
    for sample, prompt in zip(samples, fake.prompts):
        assert COMPACT_INSTRUCTION["review_question"] in prompt and ENGINE_SYNTAX["local"] not in prompt
        assert f"The review question is:\n{sample.need_text}" in prompt
    # scored as the compact format (answer only): parsed, searched, format ok
    assert [(r["error"], r["format_ok"]) for r in records] == [("none", True)] * 7

    # an explicit style the model was not trained with: refused, with what to do
    with pytest.raises(ValueError, match="trained with prompt style 'compact'.*--force-prompt-style"):
        ModelMethod(compact_checkpoint, backend="vllm", prompt_style="reasoning")
    # forced: the full prompt, and the same answer now lacks the <think> block the style asks for
    fake.prompts.clear()
    forced = ModelMethod(compact_checkpoint, name="forced", backend="vllm", max_new_tokens=8,
                         prompt_style="reasoning", force_prompt_style=True)
    records = evaluate(samples, forced, tmp_path / "out", searcher=searcher, progress=False)
    assert all(ENGINE_SYNTAX["local"] in p and COMPACT_INSTRUCTION["review_question"] not in p for p in fake.prompts)
    assert {r["format_ok"] for r in records} == {False}

    # rows of a parquet written before the task input was stored cannot be re-rendered: classified
    legacy = [sample_from_row(dict(s.row, extra_info={k: v for k, v in s.extra_info.items() if k != "task_kind"}))
              for s in samples[:2]]
    records = evaluate(legacy, method, tmp_path / "legacy", searcher=searcher, progress=False)
    assert {r["error"] for r in records} == {"generation_error"}
    assert "prepare the data again, with --style compact" in records[0]["detail"]


def test_eval_cli_refuses_a_conflicting_prompt_style(compact_checkpoint, tmp_path, caplog):
    from deepretrieval.cli import main

    with caplog.at_level(logging.ERROR):
        rc = main(["eval", "--model", str(compact_checkpoint.parent), "--task", "pubmed_mini",
                   "--prompt-style", "reasoning", "--out", str(tmp_path / "out"), "--no-plot"])
    assert rc == 2
    assert "trained with prompt style 'compact' (prompt.json), not 'reasoning'" in caplog.text


def test_model_spec_counts_a_changed_rendering_from_prompt_json(compact_checkpoint):
    from deepretrieval.eval.runner import fingerprint_of

    def spec_with(**changes):
        path = compact_checkpoint / HF_EXPORT_DIR / PROMPT_FILE
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))
        return ModelMethod(compact_checkpoint, name="m", backend="hf").spec()

    # the defaults (the quickstart's prompt.json: apply_chat_template true, no prefix override):
    # the spec has the keys it always had
    base = spec_with(apply_chat_template=True, assistant_prefix=None)
    assert set(base) == {"name", "kind", "path", "weights", "n", "temperature", "top_p", "max_new_tokens",
                         "seed", "prompt_style"}
    assert spec_with(apply_chat_template=None) == base  # not set: rendered with the default, same spec
    # a prompt.json that renders otherwise changes the spec, and so the records' fingerprint
    raw = spec_with(apply_chat_template=False)
    assert raw == dict(base, apply_chat_template=False)
    prefixed = spec_with(apply_chat_template=True, assistant_prefix="<think>\n")
    assert prefixed == dict(base, assistant_prefix="<think>\n")

    class Spec:
        def __init__(self, spec):
            self.spec = lambda: spec

    prints = {fingerprint_of(Spec(s), "pubmed_mini", 100, "local", [10, 100]) for s in (base, raw, prefixed)}
    assert len(prints) == 3
