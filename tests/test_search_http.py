"""Bounds of the live clients (http.py) against loopback fakes: redirects, deadline, size cap,
Retry-After, key redaction. Time bounds are generous (a loaded machine), faults are long."""

import json
import logging
import math
import threading
import time
import tracemalloc
from email.utils import formatdate

import pytest
import requests

from deepretrieval.search import SearchUnavailable
from deepretrieval.search.ctgov import CTGovSearchEngine
from deepretrieval.search.fakes import FakeAnswer, FakeCTGovServer, FakePubMedServer, Fault
from deepretrieval.search.http import (
    DEFAULT_DEADLINE_S,
    DEFAULT_MAX_RESPONSE_BYTES,
    MAX_REDIRECTS,
    Deadline,
    DeadlineExceeded,
    HttpClient,
    RedirectRefused,
    ResponseTooLarge,
    parse_retry_after,
    redact,
)
from deepretrieval.search.pubmed import PubMedSearchEngine
from deepretrieval.search.ratelimit import RETRY_AFTER_MAX_S, RateLimiter, credential_tag

IDS = [str(30000000 + i) for i in range(250)]
KEY = "test-key-0123456789"
LONG_QUERY = " OR ".join(f"term{i}[tiab]" for i in range(400))  # ~5 kB: POSTed


@pytest.fixture
def server():
    with FakePubMedServer(answers={"asthma": FakeAnswer(ids=IDS)}) as srv:
        yield srv


@pytest.fixture
def other():
    """A second service: 'localhost' is another host name than the first's 127.0.0.1."""
    with FakePubMedServer(answers={"asthma": FakeAnswer(ids=IDS)}) as srv:
        yield srv


@pytest.fixture
def make(tmp_path):
    engines = []

    def _make(srv, cls=PubMedSearchEngine, **kw):
        options = dict(base_url=srv.url, cache=False, rate_limit=0, timeout=2.0, max_retries=3,
                       backoff_base=0.01, backoff_max=0.05, ratelimit_dir=tmp_path / "rl")
        options.update(kw)
        engine = cls(**options)
        engines.append(engine)
        return engine

    yield _make
    for engine in engines:
        engine.close()


# -- redirects ------------------------------------------------------------------------------
@pytest.mark.parametrize("status,query,method", [(302, "asthma", "GET"), (307, "asthma", "GET"),
                                                 (307, LONG_QUERY, "POST"), (308, LONG_QUERY, "POST")])
def test_redirect_off_host_with_key_is_refused(server, other, make, status, query, method):
    server.inject(Fault("redirect", status=status, location=f"http://localhost:{other.port}"))
    engine = make(server, api_key=KEY)
    result = engine.try_search(query, k=5)
    assert result.error["type"] == "search_unavailable"
    message = result.error["message"]
    assert f"refused to follow HTTP {status} redirect to http://localhost:{other.port}" in message
    assert "off the configured host http://127.0.0.1" in message and "credentials" in message
    assert KEY not in message
    assert other.requests == []  # the key never reached the other host
    assert [r.method for r in server.requests] == [method]  # and it was not retried
    assert server.requests[0].params["api_key"] == KEY
    stats = engine.stats()
    assert stats["http_redirects_refused"] == 1 and stats["http_redirects"] == 0
    with pytest.raises(RedirectRefused):  # the raised form, for callers of search()
        server.inject(Fault("redirect", status=status, location=f"http://localhost:{other.port}"))
        engine.search(query, k=5)


def test_redirect_on_the_same_host_is_followed_with_method_and_body(server, make):
    server.inject(Fault("redirect", status=302, location=f"{server.root}/mirror"))
    engine = make(server, api_key=KEY)
    assert engine.search("asthma", k=5).ids == IDS[:5]
    first, second = server.requests
    assert second.path == "/mirror/entrez/eutils/esearch.fcgi" and second.params["api_key"] == KEY
    assert second.params["term"] == "asthma" and second.method == "GET"
    server.inject(Fault("redirect", status=307, location=f"{server.root}/mirror"))
    assert len(engine.search(LONG_QUERY, k=5).ids) == 5
    third, fourth = server.requests[2:]
    assert (third.method, fourth.method) == ("POST", "POST") and fourth.params["term"] == LONG_QUERY
    assert fourth.path.startswith("/mirror/") and fourth.params["api_key"] == KEY
    assert engine.stats()["http_redirects"] == 2


def test_redirect_off_host_without_credentials_is_followed(make):
    ids = [f"NCT{i:08d}" for i in range(1, 31)]
    with FakeCTGovServer(answers={"q": ids}) as first, FakeCTGovServer(answers={"q": ids}) as second:
        first.inject(Fault("redirect", status=301, location=f"http://localhost:{second.port}"))
        engine = make(first, cls=CTGovSearchEngine)
        assert engine.search("q", k=10).ids == ids[:10]
        assert len(first.requests) == 1 and second.requests[0].params["query.term"] == "q"


def test_redirect_loop_is_unavailable(server, make):
    server.inject(*[Fault("redirect", status=302, location=server.root)] * (MAX_REDIRECTS + 1))
    with pytest.raises(SearchUnavailable, match=f"more than {MAX_REDIRECTS} redirects"):
        make(server, api_key=KEY).search("asthma", k=5)
    assert len(server.requests) == MAX_REDIRECTS + 1


@pytest.mark.parametrize("origin,location,allowed", [
    ("http://h:80/e", "https://h/e", True),           # upgrade on the same host
    ("https://h/e", "http://h/e", False),             # downgrade would send the key in clear
    ("https://h/e", "https://h:8443/e", False),       # another port is another service
    ("https://h/e", "/other/path?x=1", True),         # relative: same origin
    ("https://h/e", "https://h.evil.org/e", False),
    ("https://h/e", "https://user:pw@evil.org/e", False),
])
def test_redirect_target_rule(tmp_path, origin, location, allowed):
    client = HttpClient("svc", RateLimiter(0, "t", tmp_path), secrets=["secret-value-123"])
    response = requests.Response()
    response.status_code, response.url = 302, origin
    response.headers["Location"] = location
    from urllib.parse import urlsplit

    parts = urlsplit(origin)
    start = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    if allowed:
        assert client._redirect_target(start, response, "x").startswith(("http://", "https://"))
    else:
        with pytest.raises(RedirectRefused) as info:
            client._redirect_target(start, response, "x")
        assert "pw" not in str(info.value)


# -- total deadline -------------------------------------------------------------------------
def test_dripping_server_is_cut_at_the_deadline(server, make):
    server.inject(Fault("drip", seconds=0.25))  # ~0.25 s per byte of a ~400-byte answer: > 90 s
    engine = make(server, timeout=30.0, deadline=2.0)
    start = time.perf_counter()
    result = engine.try_search("asthma", k=10)
    elapsed = time.perf_counter() - start
    assert result.error["type"] == "search_unavailable"
    assert "search deadline of 2s exceeded" in result.error["message"]
    assert 1.9 <= elapsed < 8.0
    assert engine.stats()["http_deadline_exceeded"] == 1


def test_server_dripping_its_headers_is_cut_at_the_deadline(server, make):
    server.inject(Fault("drip_headers", seconds=0.1))  # ~300 header bytes: ~30 s, each byte well within timeout
    engine = make(server, timeout=30.0, deadline=2.0)
    start = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match="waiting for the answer's headers"):
        engine.search("asthma", k=10)
    assert 1.9 <= time.perf_counter() - start < 8.0
    assert len(server.requests) == 1
    server.inject(Fault("drip_headers", seconds=0.001))
    assert engine.search("asthma", k=10).ids == IDS[:10]  # well-formed, only slow: read whole


def test_stalling_server_is_cut_at_the_deadline(server, make):
    server.inject(*[Fault("timeout", seconds=20.0)] * 6)  # each attempt would wait the 30 s read timeout
    engine = make(server, timeout=30.0, max_retries=5, deadline=2.0)
    start = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match="deadline of 2s exceeded") as info:
        engine.search("asthma", k=10)
    assert 1.9 <= time.perf_counter() - start < 8.0
    assert info.value.kind == "search_unavailable" and info.value.reason == "deadline"
    assert len(server.requests) == 1  # the one attempt used the whole budget


def test_deadline_spans_pages(make):
    with FakePubMedServer(answers={"asthma": FakeAnswer(ids=IDS)}, latency=0.4) as srv:
        engine = make(srv, page_size=10, deadline=1.5)
        start = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            engine.search("asthma", k=250)  # 25 pages of 0.4 s each
        assert time.perf_counter() - start < 6.0
        assert 2 <= len(srv.requests) <= 5


def test_retry_wait_past_the_deadline_fails_at_once(server, make):
    server.inject(Fault("status", status=503, headers={"Retry-After": "5"}))
    engine = make(server, deadline=2.0)
    start = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match=r"a 5\.0s wait before retry 1 would pass it.*HTTP 503"):
        engine.search("asthma", k=5)
    assert time.perf_counter() - start < 1.5 and len(server.requests) == 1


def test_deadline_object_and_defaults():
    ticks = iter([0.0, 0.5, 3.0])
    deadline = Deadline(2.0, clock=lambda: next(ticks))
    assert deadline.remaining() == 1.5 and deadline.expired
    assert Deadline(None).remaining() == math.inf
    engine = PubMedSearchEngine(cache=False, rate_limit=0)
    assert engine.http.deadline_s == DEFAULT_DEADLINE_S and engine.config()["deadline"] == DEFAULT_DEADLINE_S
    assert engine.http.max_response_bytes == DEFAULT_MAX_RESPONSE_BYTES


def test_limiter_slot_past_the_deadline_is_not_taken(tmp_path):
    limiter = RateLimiter(100, "dl", tmp_path)
    limiter.defer(5.0)
    now = time.time()
    assert limiter.acquire(latest=now + 1.0) is None  # no wait, nothing reserved
    slot = limiter.reserve()
    assert now + 4.9 <= slot <= now + 5.2  # the queue did not grow by the refused slot
    assert RateLimiter(0, "off", tmp_path).acquire(latest=now - 10) == 0.0  # no limit: always


# -- Retry-After ---------------------------------------------------------------------------
def test_parse_retry_after_forms():
    now = 1_700_000_000.0
    assert parse_retry_after("590") == 590.0
    assert parse_retry_after(formatdate(now + 590, usegmt=True), now=now) == 590.0
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("-3") == 0.0 and parse_retry_after("nan") is None
    assert parse_retry_after("inf") == math.inf


def test_limiter_defer_is_capped(tmp_path):
    limiter = RateLimiter(10, "cap", tmp_path)
    assert limiter.defer(590.0) == RETRY_AFTER_MAX_S
    assert limiter.defer(float("nan")) == 0.0
    ahead = RateLimiter(10, "cap", tmp_path).reserve() - time.time()
    assert RETRY_AFTER_MAX_S - 1 <= ahead <= RETRY_AFTER_MAX_S + 0.5


@pytest.mark.parametrize("header", ["590", "date"])
def test_long_retry_after_is_capped_shared_logged_and_counted(tmp_path, caplog, header):
    value = formatdate(time.time() + 590, usegmt=True) if header == "date" else header
    with FakePubMedServer(answers={"asthma": FakeAnswer(ids=IDS)}) as srv:
        srv.inject(Fault("status", status=429, headers={"Retry-After": value}))
        engine = PubMedSearchEngine(base_url=srv.url, cache=False, api_key=KEY, rate_limit=10,
                                    ratelimit_dir=tmp_path, deadline=1.0, timeout=2.0)
        caplog.set_level(logging.INFO, logger="deepretrieval.search.http")
        start = time.perf_counter()
        with pytest.raises(DeadlineExceeded, match="would pass it"):
            engine.search("asthma", k=5)
        assert time.perf_counter() - start < 1.0  # no point sleeping 120 s with 1 s left
        engine.close()
        host = srv.url.split("//")[1].split("/")[0]
    ahead = RateLimiter(10, credential_tag(f"ncbi@{host}", KEY), tmp_path).reserve() - time.time()
    assert RETRY_AFTER_MAX_S - 2 <= ahead <= RETRY_AFTER_MAX_S + 0.5  # not ~590: capped for every process
    stats = engine.stats()
    assert stats["http_retry_after"] == 1 and stats["http_retry_after_s"] == RETRY_AFTER_MAX_S
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Retry-After" in r.getMessage()]
    assert len(warnings) == 1
    assert "pause of 120.0s" in warnings[0].getMessage() and "capped at 120s" in warnings[0].getMessage()


def test_short_retry_after_is_honoured_and_reported_by_the_reward_manager(server, make):
    from deepretrieval.rewards import literature
    from deepretrieval.rewards.manager import RewardManager

    server.inject(Fault("status", status=429, headers={"Retry-After": "0.3"}))
    engine = make(server)
    literature.set_engine("pubmed", engine)
    try:
        manager = RewardManager(None)
        answer = 'thinking\n</think>\n<answer>{"query": "asthma"}</answer>'
        start = time.perf_counter()
        results = manager.score_texts([answer], ["pubmed"], [{"target": IDS[:4]}],
                                      [{"think_in_prompt": True, "prompt_style": "reasoning"}])
        assert time.perf_counter() - start >= 0.28
        metrics = manager.metrics(results, ["pubmed"])
    finally:
        literature.set_engine("pubmed", None)
    assert results[0]["recall"] == 1.0
    assert metrics["reward/engine/pubmed/http_retry_after"] == 1.0
    assert metrics["reward/engine/pubmed/http_retry_after_s"] == pytest.approx(0.3)
    assert metrics["reward/engine/pubmed/http_rate_limited"] == 1.0


# -- response size --------------------------------------------------------------------------
def test_declared_oversized_answer_is_refused_unread(server, make):
    server.inject(Fault("huge", size=5_000_000))
    engine = make(server, max_response_bytes=100_000)
    with pytest.raises(ResponseTooLarge, match="5,000,000 bytes is over the 100,000-byte cap"):
        engine.search("asthma", k=5)
    assert len(server.requests) == 1 and engine.stats()["http_too_large"] == 1
    assert engine.search("asthma", k=5).ids == IDS[:5]  # an answer under the cap passes


def test_undeclared_oversized_answer_stops_at_the_cap(server, make):
    server.inject(Fault("huge", size=30_000_000, declare_length=False))
    engine = make(server, max_response_bytes=1_000_000)
    tracemalloc.start()
    try:
        result = engine.try_search("asthma", k=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.error["type"] == "search_unavailable" and "1,000,000-byte cap" in result.error["message"]
    assert peak < 6_000_000  # ~1 MB kept, not 30 MB
    server.inject(Fault("huge", size=300_000, declare_length=False))
    assert make(server, max_response_bytes=1_000_000).search("asthma", k=5).ids == IDS[:5]


def test_gzip_chunked_answers_are_read_and_capped_after_decompression(server, make):
    server.inject(Fault("gzip"), Fault("gzip", size=20_000_000))
    engine = make(server, max_response_bytes=1_000_000)
    assert engine.search("asthma", k=5).ids == IDS[:5]  # compressed, chunked: read as usual
    result = engine.try_search("asthma", k=6)  # ~20 kB on the wire, 20 MB once decompressed
    assert result.error["type"] == "search_unavailable" and "1,000,000-byte cap" in result.error["message"]
    assert engine.search("asthma", k=6).ids == IDS[:6]


def test_connections_are_reused_after_a_streamed_read(server, make):
    engine = make(server)
    adapter = engine.http.session.get_adapter(server.url)
    for _ in range(5):
        engine.search("asthma", k=5)
    (pool,) = [adapter.poolmanager.pools[key] for key in adapter.poolmanager.pools.keys()]
    assert pool.num_connections == 1 and pool.num_requests == 5 and len(server.requests) == 5


# -- redaction ------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["Zq7", "k", "abcdefg"])
def test_short_key_never_logged(tmp_path, caplog, key):
    caplog.set_level(logging.DEBUG)
    with FakePubMedServer(answers={"asthma": FakeAnswer(ids=IDS)}) as srv:
        srv.inject(Fault("status", status=503), Fault("redirect", status=302, location=srv.root + "/m"))
        engine = PubMedSearchEngine(base_url=srv.url, api_key=key, cache=False, rate_limit=0, ratelimit_dir=tmp_path,
                                    backoff_base=0.01, max_retries=2)
        assert engine.search("asthma", k=3).ok
        assert srv.requests[-1].params["api_key"] == key  # sent...
        engine.close()
    urllib3_lines = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")]
    assert any("api_key=***" in line for line in urllib3_lines)  # ...and logged only redacted
    for record in caplog.records:
        assert f"api_key={key}" not in record.getMessage()
    assert "asthma" in caplog.text  # redaction by parameter does not blank other text


def test_redact_by_parameter_name():
    assert redact("GET /e?term=a&api_key=x&retmax=5") == "GET /e?term=a&api_key=***&retmax=5"
    assert redact('"api_key=Zq7 HTTP/1.1" 200') == '"api_key=*** HTTP/1.1" 200'
    assert redact("apikey=k1;") == "apikey=***;" and redact("API_KEY=abc") == "API_KEY=***"
    assert redact("pageToken=abc&term=k") == "pageToken=abc&term=k"  # not a credential


def test_fakes_drip_and_huge_answer_validly():
    """The fault answers are well-formed HTTP: a patient client reads them whole."""
    with FakePubMedServer(answers={"asthma": FakeAnswer(ids=IDS)}) as srv:
        srv.inject(Fault("drip", seconds=0.001, size=20), Fault("huge", size=200_000, declare_length=False))
        url = srv.url + "esearch.fcgi?db=pubmed&term=asthma&retmode=json&retmax=3"
        first = requests.get(url, timeout=5).json()
        second = requests.get(url, timeout=5)
    assert first["esearchresult"]["idlist"] == IDS[:3]
    assert len(second.content) >= 200_000 and json.loads(second.content)["esearchresult"]["idlist"] == IDS[:3]


def test_concurrent_searches_keep_separate_deadlines(make):
    with FakePubMedServer(answers={"asthma": FakeAnswer(ids=IDS)}) as srv:
        srv.inject(Fault("timeout", seconds=10.0, match="slow"))
        engine = make(srv, deadline=1.5, timeout=30.0)
        out = {}
        thread = threading.Thread(target=lambda: out.update(slow=engine.try_search("slow one", k=3)))
        thread.start()
        time.sleep(0.2)
        assert engine.search("asthma", k=3).ids == IDS[:3]  # not held by the stalled search
        thread.join(10)
    assert out["slow"].error["type"] == "search_unavailable" and "deadline" in out["slow"].error["message"]
