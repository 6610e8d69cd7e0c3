"""RewardManager: deduplicated parallel searches, per-sample results, metrics, Batch scoring."""

import threading
import time

import numpy as np
import pytest
import torch

from deepretrieval.rewards import literature
from deepretrieval.rewards.literature import compute_score
from deepretrieval.rewards.manager import RewardManager, compute_reward_metrics
from deepretrieval.search.base import QuerySyntaxError, SearchEngine, SearchResult, SearchUnavailable


class FakeEngine(SearchEngine):
    name = "fake"

    def __init__(self, results, syntax_errors=(), unavailable=(), delay=0.0, cached=()):
        self.results = results
        self.syntax_errors = set(syntax_errors)
        self.unavailable = set(unavailable)
        self.cached = set(cached)
        self.delay = delay
        self.calls = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def search(self, query, k=100, **filters):
        with self._lock:
            self.calls.append((query, k, dict(filters)))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            if query in self.syntax_errors:
                raise QuerySyntaxError("unexpected )", position=2, query=query)
            if query in self.unavailable:
                raise SearchUnavailable("timeout")
            ids = self.results.get(query, [])[:k]
            return SearchResult(ids=ids, total=len(ids), query=query, k=k, cached=query in self.cached)
        finally:
            with self._lock:
                self.active -= 1


def ans(query):
    return f"thinking\n</think>\n<answer>{{\"query\": \"{query}\"}}</answer>"


INFO = {"think_in_prompt": True, "prompt_style": "reasoning"}
GT = {"target": ["1", "2", "3", "4"]}


@pytest.fixture
def engines():
    mini = FakeEngine(
        {"a": ["1", "2", "3"], "b": ["1"], "c": ["9"]},
        syntax_errors={"bad)"},
        unavailable={"down"},
        cached={"b"},
    )
    trials = FakeEngine({"t": ["1", "2", "3", "4"]})
    literature.set_engine("pubmed_mini", mini)
    literature.set_engine("trials_sigir", trials)
    yield mini, trials
    literature.set_engine("pubmed_mini", None)
    literature.set_engine("trials_sigir", None)


def test_identical_queries_are_searched_once(engines):
    mini, trials = engines
    texts = [ans("a"), ans("a"), ans("b"), ans("a"), "garbage", ans("b"), ans("t")]
    sources = ["pubmed_mini"] * 6 + ["trials_sigir"]
    manager = RewardManager(None)
    results = manager.score_texts(texts, sources, [GT] * 7, [INFO] * 7)
    assert sorted(q for q, _, _ in mini.calls) == ["a", "b"]
    assert [q for q, _, _ in trials.calls] == ["t"]
    assert [r["recall"] for r in results] == [0.75, 0.75, 0.25, 0.75, 0.0, 0.25, 1.0]
    assert [r["score"] for r in results] == [6.0, 6.0, 1.5, 6.0, -4.0, 1.5, 6.0]
    assert manager.last_results is results
    assert manager.last_search_stats["searches"] == 3


def test_same_query_different_date_is_not_merged():
    engine = FakeEngine({"q": ["1"]})
    literature.set_engine("pubmed", engine)
    try:
        infos = [dict(INFO, pub_date="2001/01/01"), dict(INFO, pub_date="2002/01/01"), dict(INFO, pub_date="2001/01/01")]
        RewardManager(None).score_texts([ans("q")] * 3, ["pubmed"] * 3, [GT] * 3, infos)
        assert sorted(c[2]["max_date"] for c in engine.calls) == ["2001/01/01", "2002/01/01"]
    finally:
        literature.set_engine("pubmed", None)


def test_results_match_per_sample_compute_score(engines):
    mini, _ = engines
    texts = [ans("a"), ans("b"), ans("c"), ans("bad)"), ans("down"), ans(""), "<answer>free text</answer>"]
    manager = RewardManager(None)
    batched = manager.score_texts(texts, ["pubmed_mini"] * len(texts), [GT] * len(texts), [INFO] * len(texts))
    sequential = [compute_score("pubmed_mini", t, GT, INFO, engine=mini) for t in texts]
    keys = ("score", "recall", "error", "format_ok", "query", "n_retrieved", "tier", "search_unavailable")
    for b, s in zip(batched, sequential):
        assert {k: b[k] for k in keys} == {k: s[k] for k in keys}


def test_searches_run_in_parallel_bounded_by_num_workers():
    engine = FakeEngine({f"q{i}": ["1"] for i in range(12)}, delay=0.05)
    literature.set_engine("pubmed", engine)
    try:
        texts = [ans(f"q{i}") for i in range(12)]
        RewardManager(None, config={"num_workers": 4}).score_texts(texts, ["pubmed"] * 12, [GT] * 12, [INFO] * 12)
        assert 1 < engine.max_active <= 4
        engine.calls.clear()
        engine.max_active = 0
        cfg = {"pubmed": {"engine": "pubmed", "num_workers": 1}}
        RewardManager(None, config=cfg).score_texts(texts, ["pubmed"] * 12, [GT] * 12, [INFO] * 12)
        assert engine.max_active == 1 and len(engine.calls) == 12
    finally:
        literature.set_engine("pubmed", None)


def test_engine_that_cannot_be_created_makes_searches_unavailable():
    cfg = {"sources": {"pubmed_mini": {"engine": "local", "index_dir": "/nonexistent/index/dir"}}}
    results = RewardManager(None, config=cfg).score_texts([ans("a"), "bad"], ["pubmed_mini"] * 2, [GT] * 2, [INFO] * 2)
    assert results[0]["error"] == "search_unavailable" and results[0]["search_unavailable"]
    assert results[1]["error"] == "format"
    literature.clear_engines()


def test_metrics_hand_computed(engines):
    texts = [
        ans("a"),  # recall .75, score 6
        ans("a"),  # recall .75, score 6
        ans("b"),  # recall .25, score 1.5, engine cache hit
        ans("bad)"),  # query_syntax, score -3
        ans("down"),  # search_unavailable, left out of mean/recall
        "no tags",  # format, score -4
        ans("t"),  # trials: recall 1, score 6
    ]
    sources = ["pubmed_mini"] * 6 + ["trials_sigir"]
    manager = RewardManager(None)
    results = manager.score_texts(texts, sources, [GT] * 7, [INFO] * 7)
    m = manager.metrics(results, sources)
    scored = [6, 6, 1.5, -3, -4, 6]
    assert m["reward/mean"] == pytest.approx(sum(scored) / 6)
    assert m["reward/recall_mean"] == pytest.approx((0.75 + 0.75 + 0.25 + 0 + 0 + 1) / 6)
    assert m["reward/recall_ge_70_ratio"] == pytest.approx(3 / 6)
    assert m["reward/recall_ge_30_ratio"] == pytest.approx(3 / 6)
    assert m["reward/recall_ge_10_ratio"] == pytest.approx(4 / 6)
    assert m["reward/recall_ge_5_ratio"] == pytest.approx(4 / 6)
    assert m["reward/format_error_ratio"] == pytest.approx(1 / 7)
    assert m["reward/search_error_ratio"] == pytest.approx(1 / 7)
    assert m["reward/search_unavailable_count"] == 1
    assert m["reward/query_syntax_error_ratio"] == pytest.approx(1 / 7)
    queries = ["a", "a", "b", "bad)", "down", "t"]
    assert m["reward/query_len_mean"] == pytest.approx(sum(map(len, queries)) / 6)
    assert m["reward/unique_query_ratio"] == pytest.approx(5 / 6)
    assert m["reward/searches"] == 5  # a, b, bad), down on pubmed_mini + t on trials; none for "no tags"
    assert m["reward/search_cache_hit_ratio"] == pytest.approx(1 / 5)
    # per data source
    assert m["reward/trials_sigir/mean"] == 6.0 and m["reward/trials_sigir/recall_mean"] == 1.0
    assert m["reward/pubmed_mini/mean"] == pytest.approx((6 + 6 + 1.5 - 3 - 4) / 5)
    assert m["reward/pubmed_mini/format_error_ratio"] == pytest.approx(1 / 6)


def test_metrics_of_empty_group():
    assert compute_reward_metrics([]) == {}


def test_custom_compute_score_is_used_per_sample():
    calls = []

    def score(data_source, solution_str, ground_truth, extra_info=None):
        calls.append(solution_str)
        return len(solution_str)

    results = RewardManager(None, compute_score=score).score_texts(["ab", "abc"], ["x", "y"], [GT, GT], None)
    assert [r["score"] for r in results] == [2.0, 3.0] and calls == ["ab", "abc"]


def test_call_on_batch_places_score_on_last_valid_token(engines):
    from deepretrieval.models.tiny import load_tiny_tokenizer
    from deepretrieval.protocol import Batch

    tok = load_tiny_tokenizer()
    texts = [ans("a"), "no tags", ans("t")]
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    # decoding must give back the text for the reward to see what the model wrote
    assert [tok.decode(e) for e in encoded] == texts
    width = max(len(e) for e in encoded) + 3
    responses = torch.full((3, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        responses[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    prompts = torch.ones((3, 4), dtype=torch.long)
    batch = Batch.from_dict(
        {
            "prompts": prompts,
            "responses": responses,
            "response_mask": mask,
            "attention_mask": torch.cat([torch.ones_like(prompts), mask], dim=1),
        },
        {
            "data_source": np.array(["pubmed_mini", "pubmed_mini", "trials_sigir"], dtype=object),
            "reward_model": np.array([{"style": "rule", "ground_truth": GT}] * 3, dtype=object),
            "extra_info": np.array([INFO] * 3, dtype=object),
        },
    )
    out = RewardManager(tok)(batch)
    reward = out["reward_tensor"]
    assert reward.shape == responses.shape
    expected = [6.0, -4.0, 6.0]
    for i, ids in enumerate(encoded):
        assert reward[i, len(ids) - 1].item() == expected[i]
        assert reward[i].abs().sum().item() == abs(expected[i])
    info = out["reward_extra_info"]
    assert info["search_unavailable"] == [False, False, False]
    assert info["recall"] == [0.75, 0.0, 1.0] and info["error"] == ["none", "format", "none"]
    assert out["metrics"]["reward/mean"] == pytest.approx(8 / 3)
    # without response_mask the response half of attention_mask is used
    batch.pop(batch_keys=["response_mask"])
    assert torch.equal(RewardManager(tok)(batch, return_dict=False), reward)


def _batch_of(tok, texts, pad_to):
    from deepretrieval.protocol import Batch

    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    responses = torch.full((len(texts), pad_to), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), pad_to), dtype=torch.long)
    for i, ids in enumerate(encoded):
        responses[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    prompts = torch.ones((len(texts), 4), dtype=torch.long)
    batch = Batch.from_dict(
        {"prompts": prompts, "responses": responses, "response_mask": mask,
         "attention_mask": torch.cat([torch.ones_like(prompts), mask], dim=1)},
        {"data_source": np.array(["pubmed_mini"] * len(texts), dtype=object),
         "reward_model": np.array([{"style": "rule", "ground_truth": GT}] * len(texts), dtype=object),
         "extra_info": np.array([INFO] * len(texts), dtype=object)},
    )
    return batch, [len(e) for e in encoded]


def test_overlong_penalty_by_hand():
    from deepretrieval.rewards.overlong import OverlongBuffer

    shaping = OverlongBuffer(buffer_len=16, penalty_factor=2.0, max_response_length=64)
    # expected length 64 - 16 = 48: nothing up to it, then -(L - 48) / 16 * 2
    assert [shaping.penalty(n) for n in (0, 30, 48, 49, 56, 64)] == [0.0, 0.0, 0.0, -0.125, -1.0, -2.0]
    assert OverlongBuffer.from_config(None, 64) is None
    assert OverlongBuffer.from_config({"enable": False, "len": 16, "penalty_factor": 1.0}, 64) is None
    assert OverlongBuffer.from_config({"enable": True, "len": 16, "penalty_factor": 1}, 64) == OverlongBuffer(16, 1.0, 64)


def test_overlong_shaping_of_a_batch(engines):
    from deepretrieval.models.tiny import load_tiny_tokenizer
    from deepretrieval.rewards.overlong import OverlongBuffer

    tok = load_tiny_tokenizer()
    # the same query written short and padded with words the parser keeps out of the query, a format
    # error, and a search that is unavailable
    texts = [ans("a"), ans("a") + " and some more words after the answer", "no tags at all here, " * 4, ans("down")]
    probe, lengths = _batch_of(tok, texts, 64)
    limit = max(lengths) + 2
    batch, _ = _batch_of(tok, texts, limit)
    buffer_len = limit - lengths[0]  # the short answer sits exactly at the expected length: no penalty
    shaping = OverlongBuffer(buffer_len=buffer_len, penalty_factor=1.0, max_response_length=limit)
    plain = RewardManager(tok)(batch)
    out = RewardManager(tok, overlong=shaping)(batch)
    expected = [min(0.0, -(n - lengths[0]) / buffer_len) for n in lengths]
    assert expected[0] == 0.0 and expected[1] < 0 and expected[2] < 0
    assert out["reward_extra_info"]["overlong_penalty"] == pytest.approx(expected)
    for i, n in enumerate(lengths):
        shift = expected[i] if i != 3 else 0.0  # an unavailable search keeps its score (left out of the update)
        assert out["reward_tensor"][i, n - 1].item() == pytest.approx(plain["reward_tensor"][i, n - 1].item() + shift)
    assert out["reward_extra_info"]["search_unavailable"] == [False, False, False, True]
    assert out["reward_extra_info"]["recall"][:2] == [0.75, 0.75] and out["reward_extra_info"]["error"][2] == "format"
    metrics = out["metrics"]
    assert metrics["reward/overlong_penalty_mean"] == pytest.approx(sum(expected) / 4)
    assert metrics["reward/overlong_ratio"] == pytest.approx(sum(p < 0 for p in expected) / 4)
    assert "reward/overlong_ratio" not in plain["metrics"]


def test_manager_builds_local_engine_from_config(trials_sigir_index):
    cfg = {"trials_sigir": {"engine": "local", "index_dir": str(trials_sigir_index), "k": 1}}
    gt = {"target": ["NCT00001776", "NCT00003562"]}
    texts = [ans("NCT00001776[pmid] OR NCT00003562[pmid]"), ans("NCT00001776[pmid]"), ans("NCT00001776[pmid]"), ans("(x")]
    try:
        manager = RewardManager(None, config=cfg)
        results = manager.score_texts(texts, ["trials_sigir"] * 4, [gt] * 4, [INFO] * 4)
        # k=1: one of the two matches counts
        assert [r["recall"] for r in results] == [0.5, 0.5, 0.5, 0.0]
        assert [r["error"] for r in results] == ["none", "none", "none", "query_syntax"]
        assert manager.last_search_stats["searches"] == 3
    finally:
        literature.clear_engines()


def test_manager_with_pubmed_client_on_loopback_fake(tmp_path):
    from deepretrieval.search.fakes import FakeAnswer, FakePubMedServer

    answers = {"aspirin AND stroke": FakeAnswer(ids=["1", "2", "9"]), "broken(": FakeAnswer(ids=[], error="Unbalanced parentheses")}
    with FakePubMedServer(answers=answers, latency=0.0) as server:
        cfg = {
            "pubmed": {
                "engine": "pubmed",
                "base_url": server.url,
                "cache": False,
                "rate_limit": 100.0,
                "ratelimit_dir": str(tmp_path / "rl"),
                "max_retries": 0,
            }
        }
        info = dict(INFO, pub_date="2004/01/01")
        try:
            manager = RewardManager(None, config=cfg)
            texts = [ans("aspirin AND stroke"), ans("aspirin AND stroke")]
            results = manager.score_texts(texts, ["pubmed"] * 2, [GT] * 2, [info] * 2)
            assert len(server.requests) == 1  # identical answers: one search
            params = server.requests[0].params
            assert params["maxdate"] == "2004/01/01" and params["datetype"] == "pdat" and params["retmax"] == "3000"
            # the fake keeps every other id under a date filter: 1 and 9 -> one of four targets
            assert [r["recall"] for r in results] == [0.25, 0.25] and results[0]["score"] == 1.5
            from deepretrieval.search.fakes import Fault

            server.inject(Fault(kind="status", status=503, match="other"))
            texts = [ans("broken("), ans("other query")]
            results = manager.score_texts(texts, ["pubmed"] * 2, [GT] * 2, [info] * 2)
            by_query = {r["query"]: r for r in results}
            assert by_query["broken("]["error"] == "query_syntax" and by_query["broken("]["score"] == -3.0
            assert by_query["other query"]["error"] == "search_unavailable"
            assert by_query["other query"]["search_unavailable"] and by_query["other query"]["score"] == 0.0
        finally:
            literature.clear_engines()


# ---------------------------------------------------------------- one bad sample never fails a step


def _adversarial_texts():
    """Answers from issue #19 that used to raise in compute_score (or blow up), and the class each
    must get now."""
    deep = '{"query": "a", "x": ' + "[" * 1000 + "]" * 1000 + "}"
    big_int = '{"query": "a", "n": ' + "1" * 5000 + "}"
    wrap = "thinking\n</think>\n<answer>{}</answer>".format
    return [
        (wrap(deep), "json"),
        (wrap(big_int), "none"),
        (wrap('{"query": "' + "a " * 15_000 + '"}'), "query_syntax"),  # 30k characters: over the budget
        ("<answer>" * 20_000, "too_long"),
        (wrap("```" + " " * 2000 + "x"), "json"),
    ]


def test_adversarial_answers_are_classified_and_counted(engines):
    mini, _ = engines
    texts, expected = zip(*_adversarial_texts())
    manager = RewardManager(None)
    results = manager.score_texts(list(texts), ["pubmed_mini"] * len(texts), [GT] * len(texts), [INFO] * len(texts))
    assert [r["error"] for r in results] == list(expected)
    assert [r["score"] for r in results] == [-3.0, 6.0, -3.0, -4.0, -3.0]  # "a" finds 3 of 4 targets: 1 + 5
    assert [q for q, _, _ in mini.calls] == ["a"]
    metrics = manager.metrics(results, ["pubmed_mini"] * len(texts))
    assert metrics["reward/too_long_ratio"] == pytest.approx(1 / 5)
    assert metrics["reward/json_error_ratio"] == pytest.approx(2 / 5)
    assert metrics["reward/query_syntax_error_ratio"] == pytest.approx(1 / 5)
    assert metrics["reward/reward_error_count"] == 0.0


def test_an_exception_for_one_sample_is_a_counted_reward_error(engines, monkeypatch, caplog):
    from deepretrieval.rewards import manager as manager_module

    real_prepare, real_finish = manager_module.prepare_sample, manager_module.finish_sample

    def prepare(data_source, text, *rest):
        if "boom" in text:
            raise RecursionError("maximum recursion depth exceeded")
        return real_prepare(data_source, text, *rest)

    def finish(sample, outcome):
        if sample.query == "b":
            raise ValueError("bad finish")
        return real_finish(sample, outcome)

    monkeypatch.setattr(manager_module, "prepare_sample", prepare)
    monkeypatch.setattr(manager_module, "finish_sample", finish)
    texts = [ans("a"), ans("boom"), ans("b"), ans("boom2"), ans("a")]
    manager = RewardManager(None)
    with caplog.at_level("DEBUG", logger="deepretrieval.rewards.manager"):
        results = manager.score_texts(texts, ["pubmed_mini"] * 5, [GT] * 5, [INFO] * 5)
    assert [r["error"] for r in results] == ["none", "reward_error", "reward_error", "reward_error", "none"]
    assert [r["score"] for r in results] == [6.0, 0.0, 0.0, 0.0, 6.0]
    assert [r["search_unavailable"] for r in results] == [False, True, True, True, False]  # left out of the update
    assert results[1]["error_detail"].startswith("RecursionError: maximum recursion")
    metrics = manager.metrics(results, ["pubmed_mini"] * 5)
    assert metrics["reward/reward_error_count"] == 3.0
    assert metrics["reward/reward_error_ratio"] == pytest.approx(3 / 5)
    assert metrics["reward/mean"] == 6.0  # dropped samples do not dilute the mean
    # logged once per exception class (with traceback), then only at debug level
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and {r.exc_info[0] for r in errors} == {RecursionError, ValueError}
    manager.score_texts([ans("boom")], ["pubmed_mini"], [GT], [INFO])
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 2


def test_a_custom_compute_score_that_raises_is_a_reward_error():
    def custom(data_source, solution_str, ground_truth, extra_info):
        if solution_str == "bad":
            raise KeyError("boom")
        return 1.5

    manager = RewardManager(None, compute_score=custom)
    results = manager.score_texts(["ok", "bad"], ["pubmed_mini"] * 2, [GT] * 2, [INFO] * 2)
    assert [r["score"] for r in results] == [1.5, 0.0]
    assert [r["error"] for r in results] == ["none", "reward_error"]
    assert results[1]["search_unavailable"] is True


def test_setup_mistakes_still_raise(engines):
    with pytest.raises(KeyError, match="no reward source"):
        RewardManager(None).score_texts([ans("a")], ["no_such_source"], [GT], [INFO])


def test_too_deep_queries_are_penalised_not_dropped_with_the_local_engine(tmp_path):
    """Queries nested 400+ deep used to be search_unavailable (a RecursionError taken as the
    service's fault, sample dropped); now they are the model's fault: query_syntax."""
    from pathlib import Path

    from deepretrieval.search.local import LocalSearchEngine
    from deepretrieval.search.local_index import build_index

    build_index(Path(__file__).parent / "fixtures" / "search" / "small_corpus.jsonl", tmp_path / "idx", progress=False)
    literature.set_engine("pubmed_mini", LocalSearchEngine(tmp_path / "idx"))
    try:
        queries = ["(" * 400 + "aspirin" + ")" * 400, "aspirin" + " NOT stroke" * 500,
                   "aspirin" + " AND stroke OR warfarin" * 300, "aspirin"]
        texts = [ans(q) for q in queries]
        results = RewardManager(None).score_texts(texts, ["pubmed_mini"] * 4, [GT] * 4, [INFO] * 4)
        assert [r["error"] for r in results] == ["query_syntax"] * 3 + ["none"]
        assert [r["search_unavailable"] for r in results] == [False] * 4
        assert [r["score"] for r in results[:3]] == [-3.0] * 3
        assert "nested" in results[0]["error_detail"] and "nested too deeply" in results[1]["error_detail"]
    finally:
        literature.set_engine("pubmed_mini", None)
