"""ClinicalTrials.gov API v2 client against the loopback fake."""

import time

import pytest

from deepretrieval.search import QuerySyntaxError, SearchUnavailable, make_engine
from deepretrieval.search.ctgov import CTGovSearchEngine, parse_studies_page
from deepretrieval.search.fakes import FakeCTGovServer, Fault
from deepretrieval.search.http import TransientError

NCT = [f"NCT{i:08d}" for i in range(1, 251)]


@pytest.fixture
def server():
    with FakeCTGovServer(answers={"diabetes": NCT, "nothing": []}) as srv:
        yield srv


@pytest.fixture
def make(tmp_path):
    engines = []

    def _make(srv, **kw):
        options = dict(base_url=srv.url, cache=False, rate_limit=0, timeout=2.0, max_retries=3,
                       backoff_base=0.01, backoff_max=0.05, ratelimit_dir=tmp_path / "rl")
        options.update(kw)
        engine = CTGovSearchEngine(**options)
        engines.append(engine)
        return engine

    yield _make
    for engine in engines:
        engine.close()


def test_request_parameters(server, make):
    query = "diabetes&pageSize=1&fields=BriefTitle"
    result = make(server).search(query, k=40)
    request = server.requests[0]
    assert request.path == "/api/v2/studies" and request.method == "GET"
    assert request.params == {"query.term": query, "pageSize": "40", "fields": "NCTId",
                              "format": "json", "countTotal": "true"}
    assert result.ok and len(result.ids) == 40 and result.engine == "ctgov"


def test_paging_with_tokens(server, make):
    result = make(server, page_size=100).search("diabetes", k=250)
    assert result.ids == NCT and result.total == 250
    assert len(server.requests) == 3
    first, second, third = (r.params for r in server.requests)
    assert "pageToken" not in first and first["countTotal"] == "true"
    assert second["pageToken"] and "countTotal" not in second and third["pageToken"] != second["pageToken"]
    assert {p["pageSize"] for p in (first, second, third)} == {"100"}


def test_paging_stops_at_k_and_at_end(server, make):
    engine = make(server, page_size=100)
    result = engine.search("diabetes", k=150)
    assert result.ids == NCT[:150] and result.total == 250 and len(server.requests) == 2
    server.reset_log()
    result = make(server).search("diabetes", k=5000)
    assert result.ids == NCT and len(server.requests) == 1  # pageSize = min(k, 1000) = 1000
    assert server.requests[0].params["pageSize"] == "1000"


def test_page_size_capped_at_1000(server, make):
    engine = make(server, page_size=5000)
    assert engine.page_size == 1000


def test_zero_hits_is_a_result(server, make):
    result = make(server).search("nothing", k=10)
    assert result.ok and result.ids == [] and result.total == 0


@pytest.mark.parametrize(
    "lo,hi,expected",
    [
        ("2019", None, "AREA[StudyFirstPostDate]RANGE[2019-01-01,MAX]"),
        (None, "2019/02", "AREA[StudyFirstPostDate]RANGE[MIN,2019-02-28]"),
        ("2018/02/03", "2020-02", "AREA[StudyFirstPostDate]RANGE[2018-02-03,2020-02-29]"),
        (None, None, None),
    ],
)
def test_date_filter_expression(lo, hi, expected):
    assert CTGovSearchEngine.date_filter(lo, hi) == expected


def test_date_filter_is_sent(server, make):
    result = make(server).search("diabetes", k=500, max_date="2017/03/03")
    assert server.requests[0].params["filter.advanced"] == "AREA[StudyFirstPostDate]RANGE[MIN,2017-03-03]"
    assert result.ids == NCT[::2]
    with pytest.raises(ValueError):
        make(server).search("diabetes", k=5, max_date="March 2017")


def test_parse_error_400_is_query_syntax_without_retry(server, make):
    with pytest.raises(QuerySyntaxError, match="Error parsing query"):
        make(server).search("AREA[Condition(diabetes", k=10)
    assert len(server.requests) == 1


def test_other_400_is_unavailable_without_retry(server, make):
    server.inject(Fault("status", status=400, body="`query.foo` is unknown parameter"))
    with pytest.raises(SearchUnavailable, match="unknown parameter"):
        make(server).search("diabetes", k=10)
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", status=503),
        Fault("status", status=500, body="Internal Server Error"),
        Fault("truncated"),
        Fault("short_read"),
        Fault("reset"),
        Fault("status", status=200, body='{"unexpected": true}'),
    ],
    ids=["503", "500", "truncated", "short_read", "reset", "bad-shape"],
)
def test_transient_faults_are_retried(server, make, fault):
    server.inject(fault)
    assert make(server).search("diabetes", k=10).ids == NCT[:10]
    assert len(server.requests) == 2


def test_429_retry_after_and_timeout(server, make):
    server.inject(Fault("status", status=429, headers={"Retry-After": "0.3"}, body="Too Many Requests"),
                  Fault("timeout", seconds=3.0))
    engine = make(server, timeout=0.2)
    start = time.perf_counter()
    assert engine.search("diabetes", k=10).ids == NCT[:10]
    elapsed = time.perf_counter() - start
    # waited the 0.3 s Retry-After, then gave up on the 3 s answer after 0.2 s (slack for a loaded CI)
    assert 0.3 <= elapsed < 2.0 and len(server.requests) == 3


def test_exhausted_retries_raise_unavailable(server, make):
    server.inject(*[Fault("status", status=502)] * 3)
    engine = make(server, max_retries=2)
    result = engine.try_search("diabetes", k=10)
    assert result.error["type"] == "search_unavailable" and "after 3 attempts" in result.error["message"]
    assert result.ids == [] and len(server.requests) == 3


def test_failure_on_a_later_page_is_not_a_short_result(server, make):
    engine = make(server, page_size=100, max_retries=1)
    server.inject(Fault("status", status=503, match="diabetes"))  # first page request fails once
    assert engine.search("diabetes", k=250).ids == NCT
    server.reset_log()
    # Now every retry of page 2 fails: the whole search is unavailable, not 100 ids.
    original = server._answer

    def fail_later_pages(handler, params):
        if params.get("pageToken"):
            return 503, "busy", "text/plain"
        return original(handler, params)

    server._answer = fail_later_pages
    with pytest.raises(SearchUnavailable):
        engine.search("diabetes", k=250)


def test_parse_studies_page_shapes():
    page = parse_studies_page({"studies": [{"protocolSection": {"identificationModule": {"nctId": "NCT1"}}}],
                               "totalCount": 7, "nextPageToken": "abc"})
    assert page == {"ids": ["NCT1"], "total": 7, "next_token": "abc"}
    assert parse_studies_page({"studies": []}) == {"ids": [], "total": None, "next_token": None}
    with pytest.raises(TransientError):
        parse_studies_page({"studies": [{"protocolSection": {}}]})
    with pytest.raises(TransientError):
        parse_studies_page([])


def test_env_base_url_and_registry(monkeypatch, server, tmp_path):
    monkeypatch.setenv("DEEPRETRIEVAL_CTGOV_URL", server.url)
    engine = make_engine("ctgov", cache=False, rate_limit=0, ratelimit_dir=tmp_path)
    assert engine.base_url == server.url
    assert engine.search("diabetes", k=3).ids == NCT[:3]
    assert "CTGov" in repr(engine) and engine.config()["engine"] == "ctgov"
    assert CTGovSearchEngine(cache=False, ratelimit_dir=tmp_path).rate_limit == 1.0


# -- paging must advance (issue #19) ----------------------------------------------------------
@pytest.mark.parametrize("mode,message", [("page", "repeated ids already seen"), ("token", "repeated a nextPageToken")])
def test_stuck_paging_is_detected(make, mode, message):
    with FakeCTGovServer(answers={"diabetes": NCT}, stuck_paging=mode) as srv:
        engine = make(srv, page_size=10)
        start = time.perf_counter()
        result = engine.try_search("diabetes", k=100)
        assert time.perf_counter() - start < 5.0
        assert result.error["type"] == "search_unavailable" and message in result.error["message"]
        assert len(srv.requests) == 2 and result.ids == []  # a broken service is not a short result


def test_pages_shorter_than_asked_are_followed(make):
    with FakeCTGovServer(answers={"diabetes": NCT}, page_cap=3) as srv:
        result = make(srv, page_size=10).search("diabetes", k=20)
        assert result.ids == NCT[:20] and len(srv.requests) == 7


def test_pages_are_bounded_by_k(server, make, monkeypatch):
    engine = make(server, page_size=10)
    pages = iter([list(range(10))] + [[100 + i] for i in range(1000)])  # 10 ids, then 1 per page

    def fake_page(params, query, deadline):
        return {"ids": [f"NCT{i:08d}" for i in next(pages)], "total": 5000, "next_token": f"t{len(params)}-{time.time()}"}

    monkeypatch.setattr(engine, "_page", fake_page)
    with pytest.raises(SearchUnavailable, match=r"paging did not finish: 4 pages of 10 gave 13 of k=20"):
        engine.search("diabetes", k=20)  # ceil(20 / 10) + PAGE_SLACK = 4 pages at most


def test_inconsistent_empty_page_is_transient(server, make):
    server.inject(Fault("empty_ids"))
    engine = make(server)
    assert engine.search("diabetes", k=10).ids == NCT[:10]
    assert len(server.requests) == 2 and engine.stats()["http_inconsistent"] == 1
    with pytest.raises(TransientError, match="inconsistent"):
        parse_studies_page({"studies": [], "totalCount": 5})
    with pytest.raises(TransientError, match="inconsistent"):
        parse_studies_page({"studies": [], "nextPageToken": "abc"})
    assert parse_studies_page({"studies": [], "totalCount": 0})["ids"] == []  # a real zero
