"""The search cache: keys, serialisation, TTL, counters, engines. Storage (recovery, threads,
processes) is the shared store's, tested in tests/test_cache_store.py."""

import sqlite3
import time
from pathlib import Path

import pytest

from deepretrieval.search.base import SearchResult, SearchUnavailable
from deepretrieval.search.cache import DEFAULT_TTL_S, SearchCache, cache_key, normalize_query, resolve_cache
from deepretrieval.search.fakes import FakeCTGovServer, FakePubMedServer, Fault
from deepretrieval.search.pubmed import PubMedSearchEngine
from deepretrieval.search.ctgov import CTGovSearchEngine

ROOT = Path(__file__).resolve().parents[1]


def result(ids, engine="pubmed", **kw):
    return SearchResult(ids=list(ids), total=len(ids), engine=engine, query="q", k=10, **kw)


def test_key_identity():
    base = cache_key("pubmed", "http://h/e/", "a  AND\n b", 10, {"max_date": "2010", "min_date": None})
    assert base == cache_key("pubmed", "http://h/e", " a AND b ", 10, {"max_date": "2010"})
    others = [
        cache_key("ctgov", "http://h/e/", "a AND b", 10, {"max_date": "2010"}),
        cache_key("pubmed", "http://mirror/e/", "a AND b", 10, {"max_date": "2010"}),
        cache_key("pubmed", "http://h/e/", "a and b", 10, {"max_date": "2010"}),  # case matters in PubMed
        cache_key("pubmed", "http://h/e/", "a AND b", 11, {"max_date": "2010"}),
        cache_key("pubmed", "http://h/e/", "a AND b", 10, {"max_date": "2011"}),
        cache_key("pubmed", "http://h/e/", "a AND b", 10, {}),
    ]
    assert len(set(others + [base])) == len(others) + 1
    assert normalize_query("  x\t\ty \n") == "x y"


def test_put_get_and_counters(tmp_path):
    cache = SearchCache(tmp_path / "c.sqlite")
    assert cache.get("k1") is None
    cache.put("k1", result(["1", "2"], warnings=["w"], query_translation="t"))
    cache.put("k2", SearchResult.failed(SearchUnavailable("down"), engine="pubmed"))
    hit = cache.get("k1")
    assert hit.ids == ["1", "2"] and hit.cached and hit.warnings == ["w"] and hit.query_translation == "t"
    assert cache.get("k2") is None  # failures are never stored
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 2
    assert cache.stats()["hit_rate"] == pytest.approx(1 / 3)
    assert len(cache) == 1
    # persistent: a new object on the same file sees it
    assert SearchCache(tmp_path / "c.sqlite").get("k1").ids == ["1", "2"]


def test_ttl(tmp_path):
    cache = SearchCache(tmp_path / "c.sqlite", ttl=60)
    cache.put("old", result(["1"]))
    cache.put("new", result(["2"]))
    conn = sqlite3.connect(tmp_path / "c.sqlite")
    conn.execute("UPDATE results SET created = ? WHERE key = 'old'", (time.time() - 61,))
    conn.commit()
    conn.close()
    assert cache.get("old") is None and cache.get("new").ids == ["2"]
    assert SearchCache(tmp_path / "c.sqlite").get("old").ids == ["1"]  # no ttl: still there


def test_resolve_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPRETRIEVAL_CACHE_DIR", str(tmp_path / "cd"))
    assert resolve_cache(False) is None and resolve_cache(None) is None
    assert resolve_cache(True).path == tmp_path / "cd" / "search_cache.sqlite"
    assert resolve_cache(str(tmp_path / "x.db")).path == tmp_path / "x.db"
    obj = SearchCache(tmp_path / "y.db")
    assert resolve_cache(obj) is obj


def test_one_cache_root_for_everything(tmp_path, monkeypatch):
    from deepretrieval.search.local_index import default_index_dir
    from deepretrieval.models.pretrained import default_model_cache
    from deepretrieval.search.ratelimit import default_state_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPRETRIEVAL_CACHE_DIR", "~/dr")
    root = tmp_path / "home" / "dr"
    assert default_index_dir("pubmed_mini") == root / "indexes" / "pubmed_mini"
    assert default_model_cache() == root / "models"
    assert default_state_dir() == root / "ratelimit"
    assert resolve_cache(True).path == root / "search_cache.sqlite"


def test_engines_use_the_cache(tmp_path):
    path = tmp_path / "c.sqlite"
    kw = dict(cache=path, rate_limit=0, ratelimit_dir=tmp_path, backoff_base=0.01, max_retries=1)
    with FakePubMedServer() as srv:
        engine = PubMedSearchEngine(base_url=srv.url, **kw)
        first = engine.search("asthma  AND copd", k=20, max_date="2010")
        again = PubMedSearchEngine(base_url=srv.url, **kw).search("asthma AND copd", k=20, max_date="2010")
        assert len(srv.requests) == 1 and again.cached and not first.cached
        assert again.ids == first.ids and again.total == first.total
        engine.search("asthma AND copd", k=20)  # different filters: a miss
        assert len(srv.requests) == 2
        # a failure is not cached: the next call asks the server again
        srv.inject(Fault("status", status=503), Fault("status", status=503))
        assert engine.try_search("copd", k=5).error["type"] == "search_unavailable"
        fresh = engine.search("copd", k=5)
        assert fresh.ok and not fresh.cached and engine.search("copd", k=5).cached
        assert engine.stats()["cache_hits"] >= 1
    with FakeCTGovServer() as srv:
        ct = CTGovSearchEngine(base_url=srv.url, **kw)
        ct.search("asthma AND copd", k=20, max_date="2010")
        assert ct.search("asthma AND copd", k=20, max_date="2010").cached  # not confused with PubMed's entry
        assert len(srv.requests) == 1


# -- expiry (issue #19) -------------------------------------------------------------------------
class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_default_expiry_and_fake_clock(tmp_path):
    clock = Clock()
    cache = SearchCache(tmp_path / "c.sqlite", clock=clock)
    assert cache.ttl == DEFAULT_TTL_S == 7 * 24 * 3600
    cache.put("a", result(["1"]))
    clock.now += DEFAULT_TTL_S
    assert cache.get("a").ids == ["1"]  # exactly ttl old: still fresh
    clock.now += 1
    assert cache.get("a") is None
    cache.put("a", result(["2"]))  # re-fetched and overwritten
    assert cache.get("a").ids == ["2"]
    clock.now -= 3600  # the clock stepped back an hour: the entry is "from the future"
    assert cache.get("a") is None
    forever = SearchCache(tmp_path / "f.sqlite", ttl=float("inf"), clock=clock)
    forever.put("b", result(["3"]))
    clock.now += 1e9
    assert forever.get("b").ids == ["3"]
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="ttl"):
            SearchCache(tmp_path / "x.sqlite", ttl=bad)


def test_engine_refetches_expired_entries(tmp_path):
    clock = Clock()
    cache = SearchCache(tmp_path / "c.sqlite", ttl=60, clock=clock)
    with FakePubMedServer() as srv:
        engine = PubMedSearchEngine(base_url=srv.url, cache=cache, rate_limit=0, ratelimit_dir=tmp_path)
        assert not engine.search("asthma", k=5).cached
        assert engine.search("asthma", k=5).cached and len(srv.requests) == 1
        clock.now += 61
        again = engine.search("asthma", k=5)
        assert not again.cached and len(srv.requests) == 2
        assert engine.search("asthma", k=5).cached and len(srv.requests) == 2  # refreshed entry
        assert engine.config()["cache_ttl"] == 60


def test_self_contradicting_result_is_not_stored(tmp_path):
    cache = SearchCache(tmp_path / "c.sqlite")
    cache.put("glitch", SearchResult(ids=[], total=125, engine="pubmed", query="q", k=10))
    cache.put("zero", SearchResult(ids=[], total=0, engine="pubmed", query="q", k=10))
    assert cache.get("glitch") is None and cache.get("zero").ids == [] and len(cache) == 1


def test_search_cache_file_of_the_old_layout_is_rebuilt(tmp_path):
    path = tmp_path / "c.sqlite"  # before the shared store the table had an `engine` column
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE results (key TEXT PRIMARY KEY, engine TEXT NOT NULL, value TEXT NOT NULL,"
                 " created REAL NOT NULL)")
    conn.execute("INSERT INTO results VALUES ('k', 'pubmed', '{}', 0)")
    conn.commit()
    conn.close()
    cache = SearchCache(path)
    assert cache.enabled and len(cache) == 0
    cache.put("k", result(["1"]))
    assert cache.get("k").ids == ["1"] and cache.stats()["errors"] == 0


def test_unreadable_entry_is_a_miss(tmp_path):
    cache = SearchCache(tmp_path / "c.sqlite")
    cache.put_json("k", {"ids": "not a list of ids", "total": "many"})  # written by something else
    cache.put_json("j", [1, 2])
    assert cache.get("k") is None and cache.get("j") is None and cache.stats()["misses"] == 2
