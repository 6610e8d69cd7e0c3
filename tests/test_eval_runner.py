"""Runner, resume store, report and model generation, with a scripted engine (hand-computable)."""
import json
import math

import pytest

from deepretrieval.eval import report
from deepretrieval.eval.metrics import bootstrap_ci
from deepretrieval.eval.methods import Generation, QueryMethod, split_reasoning
from deepretrieval.eval.runner import RecordStore, evaluate
from deepretrieval.eval.samples import load_samples, sample_from_row
from deepretrieval.eval.searcher import Searcher
from deepretrieval.search.base import QuerySyntaxError, SearchEngine, SearchResult, SearchUnavailable


class ScriptedEngine(SearchEngine):
    """query -> fixed ranked ids; 'SYNTAX' raises a syntax error, 'DOWN' an outage."""

    name = "scripted"

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def search(self, query, k=100, **filters):
        self.calls.append((query, k, filters))
        if "SYNTAX" in query:
            raise QuerySyntaxError("bad token", 0, query)
        if "DOWN" in query:
            raise SearchUnavailable("service down")
        ids = self.answers.get(query, [])[:k]
        return SearchResult(ids=ids, total=len(ids), query=query, engine=self.name, k=k)


def _row(topic_id, targets, judged=None, grades=None, source="trials_sigir"):
    gt = {"target": targets}
    if judged is not None:
        gt.update(judged=judged, grades=grades)
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": f"Write a query.\n\nThe patient case is:\ncase {topic_id}"}],
        "reward_model": {"style": "rule", "ground_truth": gt},
        "extra_info": {"topic_id": topic_id, "think_in_prompt": True, "prompt_style": "reasoning",
                       "pub_date": "2010/01/01"},
    }


def _samples():
    return [
        sample_from_row(_row("t1", ["a", "b"], ["a", "b", "c"], [2, 1, 0])),
        sample_from_row(_row("t2", ["x", "y", "z", "w"], ["x", "y", "z", "w"], [1, 1, 1, 1])),
        sample_from_row(_row("t3", ["q"], ["q"], [2])),
    ]


class ScriptedMethod(QueryMethod):
    """Writes responses from a table; counts generate calls (to check resume)."""

    def __init__(self, texts, n=1, name="scripted", version=None):
        self.texts, self.n, self.name = texts, n, name
        self.version = version if version is not None else json.dumps(texts, sort_keys=True)
        self.generated = []

    def spec(self):
        return {"name": self.name, "version": self.version, "n": self.n}

    def generate(self, samples):
        self.generated.extend(s.topic_id for s in samples)
        return [[Generation(text=t) if not t.startswith("!") else Generation(error=t[1:])
                 for t in self.texts[s.topic_id]] for s in samples]


def ans(q):
    return f"reasoning here</think>\n<answer>{json.dumps({'query': q})}</answer>"


def test_sample_from_row_fields():
    s = _samples()[0]
    assert s.topic_id == "t1" and s.need_text == "case t1"
    assert s.judgements == {"a": 2, "b": 1, "c": 0} and s.relevant == ["a", "b"]


def test_evaluate_metrics_and_error_classes(tmp_path):
    engine = ScriptedEngine({"good": ["a", "c", "b"], "half": ["x", "n", "y"]})
    searcher = Searcher(k=3, cache=False, engines={"trials_sigir": engine})
    method = ScriptedMethod({"t1": [ans("good")], "t2": [ans("half")], "t3": ["no tags at all"]})
    recs = evaluate(_samples(), method, tmp_path, searcher=searcher, ks=[1, 3], progress=False)
    by = {r["topic_id"]: r for r in recs}
    assert by["t1"]["metrics"]["recall@3"] == 1.0 and by["t1"]["metrics"]["precision@1"] == 1.0
    # ndcg@3 for a(2), c(0), b(1): (2 + 1/log2(4)) / (2 + 1/log2(3))
    assert by["t1"]["metrics"]["ndcg@3"] == pytest.approx((2 + 0.5) / (2 + 1 / math.log2(3)))
    assert by["t2"]["recall"] == 0.5 and by["t2"]["ids"] == ["x", "n", "y"]
    assert by["t1"]["reasoning"] == "reasoning here" and by["t1"]["format_ok"] is True
    assert by["t3"]["error"] == "format" and by["t3"]["recall"] == 0.0
    assert engine.calls[0][1] == 3  # searched at K
    summary = report.summarize(recs, n_resamples=500)[0]
    assert summary["errors"] == {"format": 1, "none": 2}
    cell = summary["metrics"]["recall@3"]
    assert cell["mean"] == pytest.approx(0.5) and cell["n"] == 3
    ref = bootstrap_ci([1.0, 0.5, 0.0], n_resamples=500)
    assert (cell["low"], cell["high"]) == (ref.low, ref.high)


def test_infrastructure_failures_are_excluded_and_retried(tmp_path):
    engine = ScriptedEngine({"good": ["a", "b"], "ok2": ["x"]})
    searcher = Searcher(k=10, cache=False, engines={"trials_sigir": engine})
    first = ScriptedMethod({"t1": [ans("good")], "t2": [ans("DOWN now")], "t3": ["!llm_unavailable"]}, version="v")
    recs = evaluate(_samples(), first, tmp_path, searcher=searcher, progress=False)
    s = report.summarize(recs)[0]
    assert s["n_excluded_queries"] == 2 and s["n_topics"] == 1
    assert s["errors"] == {"llm_unavailable": 1, "none": 1, "search_unavailable": 1}
    assert s["metrics"]["recall@10"]["mean"] == 1.0
    # the same settings again: only the failed topics are generated again; a syntax error is the
    # writer's fault (scored 0, counted), not excluded
    again = ScriptedMethod({"t1": [ans("good")], "t2": [ans("SYNTAX (")], "t3": [ans("ok2")]}, version="v")
    recs = evaluate(_samples(), again, tmp_path, searcher=searcher, progress=False)
    assert again.generated == ["t2", "t3"]
    assert [r["error"] for r in recs] == ["none", "query_syntax", "none"]
    s = report.summarize(recs, n_resamples=300)[0]
    assert s["n_topics"] == 3 and s["metrics"]["recall@10"]["mean"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)


def test_resume_after_interruption(tmp_path):
    engine = ScriptedEngine({"good": ["a", "b"], "half": ["x", "y"], "q": ["q"]})
    texts = {"t1": [ans("good")], "t2": [ans("half")], "t3": [ans("q")]}
    searcher = Searcher(k=10, cache=tmp_path / "cache.sqlite", engines={"trials_sigir": engine})
    m1 = ScriptedMethod(texts)
    partial = evaluate(_samples(), m1, tmp_path, searcher=searcher, chunk_size=1, max_chunks=2, progress=False)
    assert [r["topic_id"] for r in partial] == ["t1", "t2"]
    # simulate a crash in the middle of writing a line
    path = tmp_path / "samples" / "trials_sigir" / "scripted.jsonl"
    with open(path, "a") as fh:
        fh.write('{"key": "t3#0", "trunc')
    m2 = ScriptedMethod(texts)
    full = evaluate(_samples(), m2, tmp_path, searcher=searcher, chunk_size=1, progress=False)
    assert m2.generated == ["t3"]  # only the unfinished topic was generated again
    assert [r["recall"] for r in full] == [1.0, 0.5, 1.0]
    calls = len(engine.calls)
    # same inputs, new output folder: generation runs again but searches come from the cache
    m3 = ScriptedMethod(texts)
    recs = evaluate(_samples(), m3, tmp_path / "other", searcher=searcher, progress=False)
    assert len(engine.calls) == calls and all(r["cached_search"] for r in recs)
    # other settings (a different fingerprint) start the file afresh
    m4 = ScriptedMethod({"t1": [ans("half")], "t2": [ans("half")], "t3": [ans("half")]})
    recs = evaluate(_samples(), m4, tmp_path, searcher=searcher, progress=False)
    assert m4.generated == ["t1", "t2", "t3"] and recs[0]["recall"] == 0.0


def test_record_store_keeps_latest(tmp_path):
    store = RecordStore(tmp_path / "r.jsonl", "fp")
    store.add({"key": "a#0", "error": "llm_unavailable"})
    assert not store.done("a#0")
    store.add({"key": "a#0", "error": "none"})
    assert RecordStore(tmp_path / "r.jsonl", "fp").done("a#0")
    assert RecordStore(tmp_path / "r.jsonl", "other").records == {}


def test_best_of_n(tmp_path):
    engine = ScriptedEngine({"good": ["a", "b"], "half": ["a"], "none": []})
    searcher = Searcher(k=10, cache=False, engines={"trials_sigir": engine})
    m = ScriptedMethod({"t1": [ans("good"), ans("half")], "t2": [ans("none"), ans("none")],
                        "t3": [ans("none"), "garbage"]}, n=2)
    recs = evaluate(_samples(), m, tmp_path, searcher=searcher, progress=False)
    assert len(recs) == 6
    s = report.summarize(recs, n_resamples=200)[0]
    assert s["metrics"]["recall@10"]["mean"] == pytest.approx((0.75 + 0 + 0) / 3)
    assert s["metrics"]["recall@10/best_of_2"]["mean"] == pytest.approx(1 / 3)
    table = report.markdown_table(report.summarize(recs))
    assert "| scripted | 0.250 [" in table and "(n=3)" in table and "format 1" in table
    paths = report.write_report(report.summarize(recs), tmp_path / "rep")
    assert paths["plot"].stat().st_size > 1000
    assert json.loads(paths["summary"].read_text())[0]["n_topics"] == 3


def test_split_reasoning():
    assert split_reasoning("<think>abc</think><answer>x</answer>") == "abc"
    assert split_reasoning("plain") == ""


def test_live_task_uses_fake_pubmed_and_pub_date(tmp_path):
    from deepretrieval.search.fakes import FakePubMedServer

    row = _row("p1", ["111", "222"], source="pubmed")
    row["prompt"] = [{"role": "user", "content": "x\nThe research is defined by the following PICO:\n"
                      "P: adults with asthma\nI: inhaled steroids\nC: placebo\nO: exacerbations"}]
    sample = sample_from_row(row)
    assert sample.pico["P"] == "adults with asthma"
    with FakePubMedServer() as server:
        cfg = {"sources": {"pubmed": {"engine": "pubmed", "base_url": server.url, "cache": False}}}
        searcher = Searcher(reward_config=cfg, cache=False)
        from deepretrieval.eval.methods import BaselineMethod

        recs = evaluate([sample], BaselineMethod("original"), tmp_path, searcher=searcher, progress=False)
    assert recs[0]["query"] == "(adults asthma) OR (inhaled steroids) OR (placebo) OR (exacerbations)"
    assert recs[0]["k"] == 3000 and recs[0]["error"] == "none"
    assert recs[0]["metrics"].keys() >= {"recall@10", "recall@100", "recall@3000"}
    req = server.requests[-1]
    assert "2010" in json.dumps(req.__dict__, default=str)  # the pub_date limit reached the service


def test_model_method_tiny_model_and_checkpoint(tmp_path):
    from deepretrieval.eval.methods import ModelMethod
    from deepretrieval.models.tiny import save_tiny_model

    hf = tmp_path / "ckpt" / "global_step_2" / "actor" / "huggingface"
    save_tiny_model(hf)
    samples = load_samples("trials_sigir", split="all")[:2]
    engine = ScriptedEngine({})
    searcher = Searcher(k=10, cache=False, engines={"trials_sigir": engine})
    m = ModelMethod(tmp_path / "ckpt", name="tiny", backend="hf", max_new_tokens=12, batch_size=2, device="cpu")
    assert m.model_dir == hf and m.backend == "hf"
    recs = evaluate(samples, m, tmp_path / "out", searcher=searcher, progress=False)
    assert len(recs) == 2
    # an untrained model writes no usable answer: counted as a writer error, not a crash
    for r in recs:
        assert isinstance(r["response"], str) and r["error"] in ("format", "json", "empty_query", "none")
        assert r["recall"] == 0.0 or r["error"] == "none"
    # greedy decoding is deterministic; sampling n=2 gives two queries per topic
    again = ModelMethod(hf, name="tiny", backend="hf", max_new_tokens=12, batch_size=1, device="cpu")
    assert [g[0].text for g in again.generate(samples)] == [r["response"] for r in recs]
    sampled = ModelMethod(hf, name="tiny-n2", backend="hf", n=2, temperature=1.0, max_new_tokens=8, device="cpu")
    gens = sampled.generate(samples)
    assert [len(g) for g in gens] == [2, 2]
    s = report.summarize(evaluate(samples, sampled, tmp_path / "out", searcher=searcher, progress=False))[0]
    assert s["n_queries"] == 4


def test_vllm_backend_plumbing_with_a_stand_in_module(tmp_path, monkeypatch):
    """vLLM is not installed here: a stand-in module with vLLM's `LLM`/`SamplingParams` API checks
    that the backend sends the trainer's rendered prompts and maps n choices back to topics."""
    import sys
    import types

    from deepretrieval.eval.methods import ModelMethod
    from deepretrieval.models.tiny import save_tiny_model

    seen = {}

    class SamplingParams:
        def __init__(self, **kw):
            seen["params"] = kw

    class LLM:
        def __init__(self, model, seed=0):
            seen["model"] = model

        def generate(self, prompts, params):
            seen["prompts"] = prompts
            n = seen["params"]["n"]
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"{i}-{j}") for j in range(n)])
                    for i in range(len(prompts))]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    hf = save_tiny_model(tmp_path / "m")
    samples = load_samples("trials_sigir", split="all")[:2]
    m = ModelMethod(hf, backend="vllm", n=3, temperature=0.7, max_new_tokens=5)
    gens = m.generate(samples)
    assert [[g.text for g in row] for row in gens] == [["0-0", "0-1", "0-2"], ["1-0", "1-1", "1-2"]]
    assert seen["params"]["n"] == 3 and seen["params"]["temperature"] == 0.7 and seen["params"]["max_tokens"] == 5
    prefix = samples[0].extra_info["assistant_prefix"]
    assert seen["prompts"][0].endswith(prefix) and samples[0].need_text in seen["prompts"][0]


def test_cli_reward_config_points_at_an_index(tmp_path, monkeypatch):
    import argparse

    from deepretrieval.paths import data_root
    from deepretrieval.eval.cli import register
    from deepretrieval.search.local_index import build_index

    idx = tmp_path / "my_index"
    build_index(str(data_root() / "trials_sigir" / "corpus.jsonl.gz"), str(idx), progress=False)
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("DEEPRETRIEVAL_CACHE_DIR", str(cache_dir))
    cfg = tmp_path / "trainer.yaml"
    cfg.write_text(f"reward:\n  sources:\n    trials_sigir: {{engine: local, index_dir: {idx}, k: 50}}\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["eval", "--task", "trials_sigir", "--limit", "2", "--baseline", "original",
                              "--reward-config", str(cfg), "--out", str(out), "--no-plot", "--bootstrap", "100"])
    assert args.func(args) == 0
    assert not (cache_dir / "indexes").exists()  # the given index was used, none was built
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["k"] == 50 and "recall@50" in summary[0]["metrics"]


def test_parquet_samples_match_the_task_split(tmp_path):
    from deepretrieval.data.tasks import prepare_task

    paths = prepare_task("trials_sigir", tmp_path)
    from_parquet = load_samples(parquet=str(paths["test"]))
    from_task = load_samples("trials_sigir", split="test")
    key = lambda s: (s.topic_id, sorted(s.relevant), sorted((s.judgements or {}).items()), s.need_text)  # noqa: E731
    assert sorted(map(key, from_parquet)) == sorted(map(key, from_task))
    assert all(s.topic and s.example_query for s in from_parquet)  # joined with the vendored topics


def test_first_run_interrupted_before_the_index_existed_resumes(tmp_path, monkeypatch):
    from deepretrieval.eval.methods import BaselineMethod

    monkeypatch.setenv("DEEPRETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))  # no index built yet
    samples = load_samples("trials_sigir", split="all")[:3]
    searcher = Searcher(cache=False)
    evaluate(samples, BaselineMethod("original"), tmp_path / "out", searcher=searcher, chunk_size=1,
             max_chunks=1, progress=False)
    m = BaselineMethod("original")
    generated = []
    real = m.generate
    m.generate = lambda chunk: generated.extend(s.topic_id for s in chunk) or real(chunk)
    recs = evaluate(samples, m, tmp_path / "out", searcher=Searcher(cache=False), progress=False)
    assert generated == [s.topic_id for s in samples[1:]] and len(recs) == 3


def test_a_configured_source_format_setting_wins_over_the_generation(tmp_path):
    """The reward's precedence (source setting over row): a generation's own style flags (an LLM's
    think_in_prompt=False, a model's prompted style) apply only where the source sets none."""
    from deepretrieval.eval.runner import score_generation

    sample = _samples()[0]  # its row: think_in_prompt true, prompt style reasoning
    answer_only = '<answer>{"query": "q"}</answer>'
    closes_think = 'r</think>\n<answer>{"query": "q"}</answer>'

    def format_ok(text, source=None, **flags):
        config = {"sources": {"trials_sigir": source}} if source else None
        searcher = Searcher(reward_config=config, cache=False, engines={"trials_sigir": ScriptedEngine({"q": ["a"]})})
        rec = score_generation(sample, Generation(text=text, **flags), searcher, [10])
        assert rec["error"] == "none" and rec["metrics"]["recall@10"] == 0.5  # a of {a, b}
        return rec["format_ok"]

    # no source setting: the generation's flags (asked to reason; nobody opened <think> for it)
    assert format_ok(answer_only, reasoning=True, think_in_prompt=False) is False
    assert format_ok(closes_think, reasoning=True, think_in_prompt=False) is False
    # a source configured to answer only: no <think> asked for, whatever the generation says
    assert format_ok(answer_only, source={"reasoning": False}, reasoning=True, think_in_prompt=False) is True
    # a source configured with <think> opened in the prompt: the closing tag alone is right
    assert format_ok(closes_think, source={"think_in_prompt": True}, reasoning=True, think_in_prompt=False) is True
    # the generation's flag still applies to what the source leaves open (reasoning here)
    assert format_ok(answer_only, source={"think_in_prompt": True}, reasoning=False) is True
