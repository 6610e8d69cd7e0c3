"""The LLM client (on the `openai` package) against the loopback fake server, then the LLM
baselines end to end. Retries, their classification and the answer cache are checked here."""

import logging
import socket
import time

import pytest

from deepretrieval.eval.fake_openai import FakeOpenAIServer
from deepretrieval.eval.llm_client import AnswerCache, ChatClient

KEY = "sk-test-SECRET-123"
X = [{"role": "user", "content": "x"}]


def _client(srv, tmp_path=None, **kw):
    return ChatClient(base_url=srv.base_url, model="m", api_key=KEY,
                      cache_path=(tmp_path / "llm.sqlite") if tmp_path else None, **kw)


def test_completion_auth_and_key_never_shown(caplog):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(lambda b: "hello " + b["messages"][-1]["content"], api_key=KEY) as srv:
        srv.fail_next(500, 1, retry_after=0.01)
        c = _client(srv)
        r = c.complete(X)
        assert r.ok and r.text == "hello x" and r.attempts == 2
        assert srv.requests[-1]["model"] == "m" and srv.requests[-1]["temperature"] == 0.0
        assert srv.requests[-1]["max_tokens"] == 1024 and "n" not in srv.requests[-1]
        assert KEY not in repr(c) and KEY not in caplog.text
        bad = ChatClient(base_url=srv.base_url, model="m", api_key="wrong")
        r = bad.complete(X)
        assert r.error == "llm_request_rejected" and r.attempts == 1  # 401: not retried
        assert "401" in r.message and "invalid api key" in r.message and "wrong" not in r.message


def test_key_echoed_by_the_server_is_scrubbed():
    with FakeOpenAIServer(lambda b: (400, {"error": {"message": f"bad request from key {KEY}"}})) as srv:
        r = _client(srv).complete(X)
    assert r.error == "llm_request_rejected" and "400" in r.message
    assert KEY not in r.message and "<api key>" in r.message


def test_5xx_retried_then_unavailable():
    with FakeOpenAIServer(lambda b: "ok") as srv:
        c = _client(srv, max_retries=2)
        srv.fail_next(503, 3, retry_after=0.01)
        r = c.complete(X)
        assert r.error == "llm_unavailable" and r.attempts == 3 and "503" in r.message
        assert len(srv.requests) == 3
        srv.fail_next(502, 2, retry_after=0.01)  # two failures, then an answer: within 2 retries
        r = c.complete(X)
        assert r.ok and r.text == "ok" and r.attempts == 3


def test_429_honours_retry_after():
    with FakeOpenAIServer(lambda b: "ok") as srv:
        c = _client(srv, max_retries=3)
        srv.fail_next(429, 2, retry_after=0.4)
        t0 = time.monotonic()
        r = c.complete(X)
        waited = time.monotonic() - t0
        assert r.ok and r.attempts == 3
        assert waited >= 0.8  # two waits of Retry-After 0.4 s (the default backoff would be shorter: 0.5 s
        #                       at most, jittered down, for the first)
        srv.fail_next(429, 1, retry_after=0.01)
        assert _client(srv, max_retries=0).complete([{"role": "user", "content": "y"}]).error == "llm_unavailable"


def test_bad_json_and_wrong_shape_are_bad_responses():
    with FakeOpenAIServer(lambda b: (200, "this is not JSON {")) as srv:
        r = _client(srv).complete(X)
        assert r.error == "llm_bad_response" and r.attempts == 1
        srv.responder = lambda b: (200, {"nochoices": True})
        assert _client(srv).complete(X).error == "llm_bad_response"
        srv.responder = lambda b: (200, {"choices": []})
        r = _client(srv).complete(X)
        assert r.error == "llm_bad_response" and r.message == "no choices in response"


def test_timeout_is_retried_then_unavailable():
    with FakeOpenAIServer(lambda b: "late", delay_s=1.5) as srv:
        r = _client(srv, max_retries=1, timeout_s=0.2).complete(X)
    assert r.error == "llm_unavailable" and "Timeout" in r.message and r.attempts == 2


def test_connection_refused_is_classified():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = ChatClient(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, timeout_s=2)
    r = c.complete(X)
    assert r.error == "llm_unavailable" and r.attempts == 2


def test_local_server_without_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeOpenAIServer(lambda b: "ok") as srv:
        c = ChatClient(base_url=srv.base_url, model="m")
        assert c.complete(X).text == "ok"


def test_settings_from_environment(monkeypatch):
    with FakeOpenAIServer(lambda b: b["model"], api_key=KEY) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        monkeypatch.setenv("OPENAI_MODEL", "env-model")
        monkeypatch.setenv("OPENAI_API_KEY", "not-this-one")
        monkeypatch.setenv("MY_KEY", KEY)
        c = ChatClient(api_key_env="MY_KEY")
        assert c.complete(X).text == "env-model"


def test_cache_and_concurrency_keep_order(tmp_path):
    with FakeOpenAIServer(lambda b: b["messages"][-1]["content"].upper(), delay_s=0.01) as srv:
        c = _client(srv, tmp_path, concurrency=4)
        convs = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
        out = c.complete_many(convs)
        assert [r.text for r in out] == [f"Q{i}" for i in range(8)]
        assert len(srv.requests) == 8
        again = _client(srv, tmp_path).complete_many(convs)  # a new client reads the same cache
        assert [r.text for r in again] == [f"Q{i}" for i in range(8)] and all(r.cached for r in again)
        assert len(srv.requests) == 8
        # a different sampling temperature is a different request
        c.complete(convs[0], temperature=0.7)
        assert len(srv.requests) == 9
        # a failure is not cached: the next call asks again
        srv.fail_next(400, 1)
        assert c.complete(convs[0], temperature=0.9).error == "llm_request_rejected"
        assert c.complete(convs[0], temperature=0.9).text == "Q0" and len(srv.requests) == 11
        assert KEY not in (tmp_path / "llm.sqlite").read_bytes().decode("latin-1")


def test_answer_cache_serialisation(tmp_path):
    cache = AnswerCache(tmp_path / "a.sqlite")
    cache.put("k", {"texts": ["a", "b"], "usage": {"total_tokens": 3}, "not": "stored"})
    assert cache.get("k") == {"texts": ["a", "b"], "usage": {"total_tokens": 3}}
    cache.put("nousage", {"texts": ["c"]})
    assert cache.get("nousage") == {"texts": ["c"], "usage": {}}
    cache.put_json("broken", {"texts": "not a list"})  # written by something else: a miss, not a crash
    assert cache.get("broken") is None and cache.get("absent") is None
    assert AnswerCache(tmp_path / "a.sqlite").get("k")["texts"] == ["a", "b"]  # persistent


def test_old_answer_cache_file_is_still_read(tmp_path):
    import json
    import sqlite3

    path = tmp_path / "old.sqlite"  # the layout before the shared store: no `created` column
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO answers VALUES (?, ?)", ("k", json.dumps({"texts": ["old"], "usage": {}})))
    conn.commit()
    conn.close()
    assert AnswerCache(path).get("k") == {"texts": ["old"], "usage": {}}


def test_azure_url_and_header():
    with FakeOpenAIServer(lambda b: "ok", api_key=KEY) as srv:
        c = ChatClient(base_url=srv.root_url, model="dep1", api_key=KEY, azure_api_version="2024-06-01")
        assert c.complete(X).text == "ok"
        assert srv.paths[-1] == "/openai/deployments/dep1/chat/completions?api-version=2024-06-01"
        assert c.url == srv.root_url + srv.paths[-1]


def test_model_required(monkeypatch):
    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    with pytest.raises(ValueError):
        ChatClient(base_url="http://127.0.0.1:1/v1")


# ----------------------------------------------------------------------------- LLM baselines end to end

import json  # noqa: E402

from deepretrieval.paths import data_root  # noqa: E402
from deepretrieval.data.prompts import legacy_task_input_from_prompt  # noqa: E402
from deepretrieval.eval import baselines, report  # noqa: E402
from deepretrieval.eval.methods import BaselineMethod, LLMMethod  # noqa: E402
from deepretrieval.eval.runner import evaluate  # noqa: E402
from deepretrieval.eval.samples import load_samples  # noqa: E402
from deepretrieval.eval.searcher import Searcher  # noqa: E402
from deepretrieval.rewards.parsing import format_answer  # noqa: E402
from deepretrieval.search.local import LocalSearchEngine  # noqa: E402
from deepretrieval.search.local_index import build_index  # noqa: E402


@pytest.fixture(scope="module")
def trials_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "trials"
    build_index(str(data_root() / "trials_sigir" / "corpus.jsonl.gz"), str(out), progress=False)
    return LocalSearchEngine(str(out))


def bag_writer(body):
    """A stand-in LLM that answers with the case's words joined by OR (the `original` baseline)."""
    case = legacy_task_input_from_prompt(body["messages"])  # a request holds the messages only
    return format_answer(baselines.or_query(case), thinking="key words", lines=True)


def test_llm_modes_end_to_end(tmp_path, trials_engine):
    samples = load_samples("trials_sigir", split="all")
    few = samples[:3]
    searcher = Searcher(cache=False, engines={"trials_sigir": trials_engine})
    with FakeOpenAIServer(bag_writer, api_key=KEY) as srv:
        client = ChatClient(base_url=srv.base_url, model="fake-llm", api_key=KEY,
                            cache_path=tmp_path / "llm.sqlite")
        recs = {}
        for mode in baselines.PROMPT_MODES:
            before = len(srv.requests)
            m = LLMMethod(client, mode=mode, pool=samples, shots=2)
            recs[mode] = evaluate(few, m, tmp_path, searcher=searcher, progress=False)
            sent = srv.requests[before:]
            assert len(sent) == 3
            # requests run concurrently: find the one for the first topic
            msgs = next(r["messages"] for r in sent if r["messages"][-1] == few[0].prompt[-1])
            roles = [x["role"] for x in msgs]
            own = few[0].example_query
            if mode == "zero_shot":
                assert msgs == few[0].prompt
            if mode in ("icl", "icl_few_shot"):
                assert roles[0] == "system" and "OR" in msgs[0]["content"]
            if mode in ("few_shot", "icl_few_shot"):
                assert roles.count("assistant") == 2 and roles[-1] == "user"
                shots = [json.loads(x["content"].split("<answer>")[1].split("</answer>")[0])["query"]
                         for x in msgs if x["role"] == "assistant"]
                others = {s.example_query for s in samples[1:]}
                assert all(q in others for q in shots) and own not in shots
        orig = evaluate(few, BaselineMethod("original"), tmp_path, searcher=searcher, progress=False)
    for rs in recs.values():
        assert [r["query"] for r in rs] == [r["query"] for r in orig]
        assert [r["recall"] for r in rs] == [r["recall"] for r in orig]
        assert rs[0]["reasoning"] == "key words" and rs[0]["format_ok"] is True  # a chat model opens <think> itself
    table = report.markdown_table(report.summarize([r for rs in recs.values() for r in rs]))
    assert "| llm-fake-llm-icl_few_shot |" in table


def test_llm_error_classes_and_resume(tmp_path, trials_engine):
    few = load_samples("trials_sigir", split="all")[:3]
    searcher = Searcher(cache=False, engines={"trials_sigir": trials_engine})
    answers = {few[0].need_text: "I would search for lung cancer.",        # no answer block
               few[1].need_text: "<answer>{query: lung}</answer>",        # not JSON
               few[2].need_text: '<answer>{"query": "lung AND (cancer"}</answer>'}  # syntax error

    def responder(body):
        return answers[legacy_task_input_from_prompt(body["messages"])]

    with FakeOpenAIServer(responder) as srv:
        client = ChatClient(base_url=srv.base_url, model="m", max_retries=1,
                            cache_path=tmp_path / "llm.sqlite")
        recs = evaluate(few, LLMMethod(client, "zero_shot"), tmp_path, searcher=searcher, progress=False)
        assert [r["error"] for r in recs] == ["format", "json", "query_syntax"]
        assert all(r["recall"] == 0.0 for r in recs)
        # an outage: classified, excluded from the means, and retried by the next run
        srv.fail_next(503, 100, retry_after=0.01)
        out2 = tmp_path / "second"
        client2 = ChatClient(base_url=srv.base_url, model="m2", max_retries=1)
        recs = evaluate(few, LLMMethod(client2, "zero_shot"), out2, searcher=searcher, progress=False)
        assert {r["error"] for r in recs} == {"llm_unavailable"}
        s = report.summarize(recs)[0]
        assert s["n_topics"] == 0 and s["n_excluded_queries"] == 3
        srv.clear_failures()
        answers.update({k: bag_writer({"messages": [{"role": "user", "content": "The patient case is:\n" + k}]})
                        for k in answers})
        recs = evaluate(few, LLMMethod(client2, "zero_shot"), out2, searcher=searcher, progress=False)
        assert {r["error"] for r in recs} == {"none"}


def test_cli_llm_and_baseline_key_not_written(tmp_path, monkeypatch, capsys):
    from deepretrieval.eval.cli import register
    import argparse

    monkeypatch.setenv("DEEPRETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MY_KEY", KEY)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "out"
    with FakeOpenAIServer(bag_writer, api_key=KEY) as srv:
        args = parser.parse_args([
            "eval", "--task", "trials_sigir", "--split", "all", "--limit", "2", "--baseline", "original",
            "--llm", "fake", "--llm-mode", "icl", "--llm-mode", "zero_shot", "--llm-base-url", srv.base_url,
            "--llm-api-key-env", "MY_KEY", "--out", str(out), "--bootstrap", "200", "--no-plot"])
        assert args.func(args) == 0
        assert len(srv.requests) == 4
        # re-running the same command reuses every finished sample: no request, same table
        table = (out / "table.md").read_text()
        assert args.func(args) == 0
        assert len(srv.requests) == 4 and (out / "table.md").read_text() == table
    assert "| original |" in table and "| llm-fake-icl |" in table and "| llm-fake-zero_shot |" in table
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in capsys.readouterr().out
    args = parser.parse_args(["eval", "--report-only", "--out", str(out), "--no-plot"])
    assert args.func(args) == 0


def test_llm_n_samples_and_short_answers(tmp_path, trials_engine):
    few = load_samples("trials_sigir", split="all")[:2]
    searcher = Searcher(cache=False, engines={"trials_sigir": trials_engine})
    with FakeOpenAIServer(bag_writer) as srv:
        client = ChatClient(base_url=srv.base_url, model="m")
        recs = evaluate(few, LLMMethod(client, "zero_shot", n=2), tmp_path, searcher=searcher, progress=False)
        assert srv.requests[0]["n"] == 2 and srv.requests[0]["temperature"] == 1.0
        assert len(recs) == 4 and {r["error"] for r in recs} == {"none"}
        s = report.summarize(recs, n_resamples=100)[0]
        assert "recall@100/best_of_2" in s["metrics"]

        def one_choice(body):  # an endpoint that ignores `n`
            text = bag_writer(body)
            return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}

        srv.responder = one_choice
        client2 = ChatClient(base_url=srv.base_url, model="m-one")
        recs = evaluate(few, LLMMethod(client2, "zero_shot", n=2), tmp_path, searcher=searcher, progress=False)
        assert [r["error"] for r in recs] == ["none", "llm_bad_response"] * 2
