"""PubMed esearch client against the loopback fake (real HTTP on 127.0.0.1)."""

import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from deepretrieval.search import QuerySyntaxError, SearchUnavailable, make_engine
from deepretrieval.search.fakes import FakeAnswer, FakePubMedServer, Fault
from deepretrieval.search.http import RetryPolicy, TransientError, parse_retry_after, redact
from deepretrieval.search.pubmed import (
    MAX_RETRIEVABLE,
    OPEN_MAX_DATE,
    OPEN_MIN_DATE,
    PubMedSearchEngine,
    classify_esearch_error,
    esearch_warnings,
    parse_esearch,
)
from deepretrieval.search.ratelimit import RateLimiter, credential_tag

ROOT = Path(__file__).resolve().parents[1]
IDS = [str(30000000 + i) for i in range(250)]


@pytest.fixture
def server():
    with FakePubMedServer(answers={"asthma": FakeAnswer(ids=IDS, querytranslation='"asthma"[MeSH Terms]')}) as srv:
        yield srv


@pytest.fixture
def make(tmp_path):
    engines = []

    def _make(srv, **kw):
        options = dict(
            base_url=srv.url, cache=False, rate_limit=0, timeout=2.0, max_retries=3,
            backoff_base=0.01, backoff_max=0.05, ratelimit_dir=tmp_path / "rl",
        )
        options.update(kw)
        engine = PubMedSearchEngine(**options)
        engines.append(engine)
        return engine

    yield _make
    for engine in engines:
        engine.close()


def test_generated_query_cannot_change_parameters(server, make):
    query = "asthma&retmax=1&db=pmc&api_key=stolen"
    result = make(server).search(query, k=30)
    params = server.requests[0].params
    assert params["term"] == query
    assert params["db"] == "pubmed" and params["retmax"] == "30" and "api_key" not in params
    assert params["retmode"] == "json" and params["sort"] == "relevance" and params["tool"] == "deepretrieval"
    assert result.ok and len(result.ids) == 30  # synthetic answer for the unknown term


def test_long_query_is_posted(server, make):
    query = " OR ".join(f"term{i}[tiab]" for i in range(400))  # ~5 kB
    engine = make(server, email="a@b.org")
    result = engine.search(query, k=10)
    request = server.requests[0]
    assert request.method == "POST"
    assert request.params["term"] == query and request.params["email"] == "a@b.org"
    assert result.ok and len(result.ids) == 10
    engine.search("asthma", k=10)
    assert server.requests[1].method == "GET"


def test_paging_with_retstart_retmax(server, make):
    result = make(server, page_size=100).search("asthma", k=250)
    assert result.ids == IDS and result.total == 250
    pages = [(r.params["retstart"], r.params["retmax"]) for r in server.requests]
    assert pages == [("0", "100"), ("100", "100"), ("200", "50")]
    assert result.query_translation == '"asthma"[MeSH Terms]'
    assert result.engine == "pubmed" and result.k == 250


def test_paging_stops_at_end_of_results(server, make):
    result = make(server, page_size=100).search("asthma", k=1000)
    assert result.ids == IDS and result.total == 250
    assert len(server.requests) == 3


def test_k_above_pubmed_ceiling_is_clamped_with_warning(server, make):
    result = make(server).search("asthma", k=20000)
    assert server.requests[0].params["retmax"] == str(MAX_RETRIEVABLE)
    assert any("9,999" in w for w in result.warnings)
    assert result.ids == IDS


def test_date_filters(server, make):
    engine = make(server)
    engine.search("asthma", k=5, min_date="2001", max_date="2010-03-05")
    p = server.requests[-1].params
    assert (p["datetype"], p["mindate"], p["maxdate"]) == ("pdat", "2001", "2010/03/05")
    result = engine.search("asthma", k=500, max_date="2015/06")
    p = server.requests[-1].params
    assert (p["mindate"], p["maxdate"]) == (OPEN_MIN_DATE, "2015/06")
    assert result.ids == IDS[::2]  # the fake's visible stand-in for a date filter
    engine.search("asthma", k=5, min_date="1999/12/01")
    assert server.requests[-1].params["maxdate"] == OPEN_MAX_DATE
    engine.search("asthma", k=5)
    assert "datetype" not in server.requests[-1].params
    with pytest.raises(ValueError):
        engine.search("asthma", k=5, max_date="05/06/2010")
    with pytest.raises(ValueError):
        engine.search("asthma", k=5, publication_type="review")


def test_warnings_and_zero_hits(make):
    answers = {
        "zzqx asthma": FakeAnswer(
            ids=["1", "2"],
            errorlist={"phrasesnotfound": ["zzqx"], "fieldsnotfound": []},
            warninglist={"phrasesignored": ["the"], "quotedphrasesnotfound": ['"heart  fail"'], "outputmessages": []},
        ),
        "nothingatall": FakeAnswer(ids=[]),
    }
    with FakePubMedServer(answers=answers) as srv:
        engine = make(srv)
        result = engine.search("zzqx asthma", k=10)
        assert result.ids == ["1", "2"] and result.total == 2
        assert result.warnings == ["phrase not found: zzqx", "phrase ignored: the", 'quoted phrase not found: "heart  fail"']
        empty = engine.search("nothingatall", k=10)
        assert empty.ok and empty.ids == [] and empty.total == 0
        assert empty.warnings == ["output message: No items found."]


def test_esearch_warnings_tolerates_odd_shapes():
    assert esearch_warnings({"errorlist": None, "warninglist": {"outputmessages": "one"}}) == ["output message: one"]
    assert esearch_warnings({}) == []


@pytest.mark.parametrize(
    "message,expected",
    [
        ("Invalid query", QuerySyntaxError),
        ("Empty term and query_key - nothing todo", QuerySyntaxError),
        ("Search Backend failed: ... Empty Term in the request", QuerySyntaxError),
        ("Unbalanced parentheses in term", QuerySyntaxError),
        ("Search Backend failed: Database is not available", Exception),
        ("Search Backend failed: Read timed out", Exception),
        ("something nobody documented", Exception),
    ],
)
def test_classify_esearch_error(message, expected):
    error = classify_esearch_error(message, "q")
    if expected is QuerySyntaxError:
        assert isinstance(error, QuerySyntaxError) and message in str(error)
    else:
        assert not isinstance(error, QuerySyntaxError)  # transient: retried, then unavailable


def test_error_in_http_200_for_bad_query_is_syntax_error_without_retry(make):
    with FakePubMedServer(answers={"((x": FakeAnswer(ids=[], error="Invalid query")}) as srv:
        with pytest.raises(QuerySyntaxError, match="Invalid query"):
            make(srv).search("((x", k=10)
        assert len(srv.requests) == 1


def test_backend_error_in_http_200_is_retried_then_unavailable(server, make):
    server.inject(*[Fault("error200")] * 4)
    engine = make(server, max_retries=3)
    with pytest.raises(SearchUnavailable, match="after 4 attempts.*Backend failed"):
        engine.search("asthma", k=10)
    assert len(server.requests) == 4
    failed = engine.try_search("asthma", k=10)  # faults used up: succeeds now
    assert failed.ok and failed.ids == IDS[:10]


def test_empty_query_is_syntax_error_without_request(server, make):
    engine = make(server)
    result = engine.try_search("   ", k=10)
    assert result.error["type"] == "query_syntax" and result.ids == []
    assert server.requests == []


def test_429_with_retry_after_is_honoured(server, make):
    server.inject(Fault("status", status=429, headers={"Retry-After": "0.4"},
                        body=json.dumps({"error": "API rate limit exceeded", "count": "11", "limit": "10"})))
    engine = make(server)
    start = time.perf_counter()
    result = engine.search("asthma", k=10)
    assert time.perf_counter() - start >= 0.38
    assert result.ids == IDS[:10] and len(server.requests) == 2
    assert engine.stats()["http_rate_limited"] == 1


def test_5xx_burst_then_success_and_exhaustion(server, make):
    server.inject(Fault("status", status=503), Fault("status", status=502), Fault("status", status=500))
    engine = make(server, max_retries=3)
    assert engine.search("asthma", k=10).ids == IDS[:10]
    assert [r.status for r in server.requests] == [503, 502, 500, 200]
    server.inject(*[Fault("status", status=503)] * 4)
    result = engine.try_search("asthma", k=11)
    assert result.error["type"] == "search_unavailable" and "HTTP 503" in result.error["message"]
    assert result.ids == [] and not result.ok


def test_timeout_is_retried(server, make):
    server.inject(Fault("timeout", seconds=3.0))
    engine = make(server, timeout=0.2)
    start = time.perf_counter()
    assert engine.search("asthma", k=10).ids == IDS[:10]
    assert time.perf_counter() - start < 2.0  # gave up on the slow answer after 0.2 s (slack for a loaded CI)


@pytest.mark.parametrize("kind", ["truncated", "short_read", "reset"])
def test_broken_bodies_are_retried(server, make, kind):
    server.inject(Fault(kind))
    assert make(server).search("asthma", k=10).ids == IDS[:10]
    assert len(server.requests) == 2


def test_non_json_rate_limit_body_in_200_is_transient(server, make):
    server.inject(Fault("status", status=200, body='{"error":"API rate limit exceeded"}'))
    assert make(server).search("asthma", k=3).ids == IDS[:3]


def test_bad_request_is_unavailable_not_the_models_fault(server, make):
    server.inject(Fault("status", status=400, body="Bad Request"))
    with pytest.raises(SearchUnavailable, match="HTTP 400"):
        make(server).search("asthma", k=3)
    assert len(server.requests) == 1


def test_retry_policy_and_retry_after_parsing():
    policy = RetryPolicy(max_retries=3, backoff_base=0.5, backoff_max=4.0)
    import random

    rng = random.Random(0)
    for attempt in range(8):
        assert 0.0 <= policy.delay(attempt, rng=rng) <= min(4.0, 0.5 * 2 ** attempt)
    assert policy.delay(0, retry_after=7.0, rng=rng) == 7.0
    assert policy.delay(0, retry_after=1000.0, rng=rng) == policy.retry_after_max
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_rate_defaults_and_env(monkeypatch, tmp_path, server):
    monkeypatch.delenv("NCBI_API_KEY", raising=False)
    assert PubMedSearchEngine(cache=False, ratelimit_dir=tmp_path).rate_limit == 3.0
    monkeypatch.setenv("NCBI_API_KEY", "k-from-env")
    engine = PubMedSearchEngine(cache=False, ratelimit_dir=tmp_path)
    assert engine.rate_limit == 10.0 and engine.has_api_key
    monkeypatch.setenv("DEEPRETRIEVAL_PUBMED_URL", server.url)
    engine = make_engine("pubmed", cache=False, rate_limit=0, ratelimit_dir=tmp_path)
    assert engine.base_url == server.url
    assert engine.search("asthma", k=2).ids == IDS[:2]
    assert server.requests[0].params["api_key"] == "k-from-env"


def test_client_rate_limit_keeps_server_happy(tmp_path):
    with FakePubMedServer(rate_limit=10) as srv:
        engine = PubMedSearchEngine(base_url=srv.url, cache=False, api_key="rate-test-key", ratelimit_dir=tmp_path,
                                    timeout=2.0, backoff_base=0.01)
        start = time.perf_counter()
        results = engine.batch_search([f"q{i}" for i in range(15)], k=5, threads=6)
        elapsed = time.perf_counter() - start
        engine.close()
    assert all(r.ok for r in results)
    # Sends leave 1/(10*0.95) s apart; arrival jitter on a loaded machine can still push one
    # request into a full window (it is then retried after Retry-After, as in production).
    assert srv.rate_limited <= 1
    assert elapsed >= 14 / 9.5 - 0.01


def test_api_key_never_leaks(tmp_path, caplog):
    key = "SEKRET+key/42"
    caplog.set_level(logging.DEBUG)
    with FakePubMedServer() as srv:
        engine = PubMedSearchEngine(base_url=srv.url, api_key=key, cache=tmp_path / "c.sqlite", rate_limit=0,
                                    ratelimit_dir=tmp_path / "rl", backoff_base=0.01, max_retries=1)
        srv.inject(Fault("status", status=503))
        assert engine.search("asthma", k=3).ok
        assert srv.requests[-1].params["api_key"] == key  # it is sent...
        port = srv.port
    # ...and a connection failure (requests puts the whole URL in its message) must not show it.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    engine2 = PubMedSearchEngine(base_url=f"http://127.0.0.1:{dead_port}/eutils/", api_key=key, cache=False,
                                 rate_limit=0, ratelimit_dir=tmp_path / "rl", backoff_base=0.01, max_retries=1)
    with pytest.raises(SearchUnavailable) as info:
        engine2.search("asthma", k=3)
    texts = [str(info.value), repr(engine), repr(engine2), json.dumps(engine.config()), caplog.text,
             str(vars(engine)), str(engine._options), f"{engine._api_key}",
             engine.try_search("x y", k=1).to_dict().__repr__()]
    for text in texts:
        assert key not in text and "SEKRET" not in text
    assert "api_key=***" in caplog.text  # urllib3 did log the request URL, redacted
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"SEKRET" not in path.read_bytes()
            assert "SEKRET" not in path.name
    assert port  # the first server answered
    assert redact(f"x={key}") == "x=***"


# -- cross-thread / cross-process limiter -----------------------------------------------------
def test_limiter_spaces_threads(tmp_path):
    limiter = RateLimiter(50, "t", tmp_path)
    slots = []
    lock = threading.Lock()

    def work():
        for _ in range(5):
            slot = limiter.reserve()
            with lock:
                slots.append(slot)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slots.sort()
    assert len(slots) == 20
    assert all(b - a >= 0.02 - 1e-5 for a, b in zip(slots, slots[1:]))


def test_limiter_defer_holds_everyone_back(tmp_path):
    a = RateLimiter(100, "shared", tmp_path)
    b = RateLimiter(100, "shared", tmp_path)
    a.defer(0.3)
    start = time.time()
    assert b.reserve() >= start + 0.29


def test_retry_after_slows_other_engines_sharing_the_key(tmp_path):
    with FakePubMedServer() as srv:
        kw = dict(base_url=srv.url, cache=False, api_key="shared-test-key", ratelimit_dir=tmp_path, backoff_base=0.01)
        first, second = PubMedSearchEngine(**kw), PubMedSearchEngine(**kw)
        srv.inject(Fault("status", status=429, headers={"Retry-After": "0.5"}))
        thread = threading.Thread(target=first.search, args=("asthma",), kwargs={"k": 2})
        thread.start()
        while not srv.requests:
            time.sleep(0.005)
        time.sleep(0.1)
        start = time.perf_counter()
        second.search("other", k=2)
        thread.join()
    assert time.perf_counter() - start >= 0.3


def test_credential_tag_hides_key():
    tag = credential_tag("ncbi@host", "my-secret-key")
    assert "my-secret-key" not in tag and tag != credential_tag("ncbi@host", "other")
    assert credential_tag("ncbi@host", None) == credential_tag("ncbi@host", None)


def test_limiter_is_shared_across_processes(tmp_path):
    script = textwrap.dedent(
        f"""
        import json, sys, time
        sys.path.insert(0, {str(ROOT / 'code')!r})
        from deepretrieval.search.ratelimit import RateLimiter
        lim = RateLimiter(20, "proc", {str(tmp_path)!r})
        slots = []
        for _ in range(8):
            slot = lim.reserve()
            time.sleep(max(0.0, slot - time.time()))
            slots.append(slot)
        print(json.dumps(slots))
        """
    )
    start = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    slots = sorted(s for out in outputs for s in json.loads(out))
    assert len(slots) == 24
    assert all(b - a >= 0.05 - 1e-5 for a, b in zip(slots, slots[1:]))  # 20/s across 3 processes
    assert slots[-1] - slots[0] >= 23 * 0.05 - 1e-4
    assert slots[0] >= start - 1e-3


def test_engine_pickles_for_ray_workers(server, make, tmp_path):
    import pickle

    from deepretrieval.search.cache import SearchCache

    engine = make(server, cache=SearchCache(tmp_path / "c.sqlite", ttl=99), page_size=100,
                  api_key="pickled-key-123")
    engine.search("asthma", k=5)
    clone = pickle.loads(pickle.dumps(engine))
    assert clone.has_api_key and "pickled-key" not in repr(vars(clone))
    assert clone.base_url == engine.base_url and clone.page_size == 100
    assert clone.cache.path == tmp_path / "c.sqlite" and clone.cache.ttl == 99
    assert clone.search("asthma", k=5).cached
    assert clone.search("asthma", k=150).ids == IDS[:150]
    assert server.requests[-1].params["api_key"] == "pickled-key-123"


def test_bench_script_smoke():
    sys.path.insert(0, str(ROOT / "scripts"))
    import argparse

    from bench_pubmed_fake import add_arguments, run_pubmed_fake

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)  # an option the caller already has
    add_arguments(parser)
    args = parser.parse_args(["--queries", "4", "--pages", "2", "--page-size", "10",
                              "--latency", "0.01", "--rate", "50"])
    out = run_pubmed_fake(args)
    assert out["requests"] == 8 and out["rate_bound_s"] == pytest.approx(8 / 50)
    assert out["concurrent"]["server_requests"] == 8 and out["concurrent"]["errors"] == 0
    assert out["concurrent"]["ids"] == 4 * 20
    assert out["cache_rerun"]["cached"] == 4 and out["cache_rerun"]["server_requests"] == 0
    assert out["sequential"]["server_requests"] == 8 and out["threads"] == 2


# -- inconsistent answers are glitches, not zero-hit results (issue #19) ----------------------
def test_count_without_ids_is_retried_then_unavailable_and_never_cached(server, make, tmp_path):
    from deepretrieval.search.cache import SearchCache

    cache = SearchCache(tmp_path / "c.sqlite")
    engine = make(server, cache=cache, max_retries=3)
    server.inject(Fault("empty_ids"))
    assert engine.search("asthma", k=10).ids == IDS[:10]  # one glitch: retried
    server.inject(*[Fault("empty_ids")] * 4)
    result = engine.try_search("asthma", k=20)
    assert result.error["type"] == "search_unavailable"  # dropped, not recall 0
    assert "inconsistent esearch answer: count 125 but no ids" in result.error["message"]
    assert len(cache) == 1 and engine.stats()["http_inconsistent"] == 5  # only the good k=10 answer
    fresh = engine.search("asthma", k=20)
    assert fresh.ids == IDS[:20] and not fresh.cached


def test_parse_esearch_consistency():
    def payload(count, ids):
        return {"esearchresult": {"count": str(count), "idlist": ids}}

    with pytest.raises(TransientError, match="inconsistent"):
        parse_esearch(payload(5, []), "q", retstart=0, retmax=10)
    with pytest.raises(TransientError, match="inconsistent"):
        parse_esearch(payload(30, []), "q", retstart=20, retmax=10)
    assert parse_esearch(payload(0, []), "q", retstart=0, retmax=10)["ids"] == []  # a real zero
    assert parse_esearch(payload(20, []), "q", retstart=20, retmax=10)["ids"] == []  # past the end
    assert parse_esearch(payload(5, ["1"]), "q", retstart=0, retmax=10)["count"] == 5


def test_page_of_repeated_ids_is_a_paging_error(server, make, monkeypatch):
    engine = make(server, page_size=10)
    calls = []

    def same_page(params, query, deadline):  # a server ignoring retstart
        calls.append(params["retstart"])
        return {"count": 250, "ids": IDS[:10], "translation": None, "warnings": []}

    monkeypatch.setattr(engine, "_request", same_page)
    with pytest.raises(SearchUnavailable, match="retstart 10 repeated ids already seen"):
        engine.search("asthma", k=50)
    assert calls == ["0", "10"]
