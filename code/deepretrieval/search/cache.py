"""Persistent cache of search results, shared by threads and processes.

An entry is keyed by a SHA-256 of the canonical JSON of

    (engine, base URL, normalised query, k, filters)

where the query is normalised by collapsing runs of white space (case is kept: PubMed
needs upper-case Boolean operators). Credentials are never part of a key. Only successful
results are stored: a service failure must be retried later, not replayed; so is a result
that contradicts itself (`total > 0` with no id), which only a glitch produces.

Storage, expiry, concurrency and the failure policy are the shared store's
(`deepretrieval/cache_store.py`, also behind the LLM answer cache): entries expire after `ttl`
seconds, default `DEFAULT_TTL_S` (7 days: live indexes change daily, and a bad entry must not
outlive a week of training); `ttl=math.inf` keeps entries for ever. Engines take it as
`cache_ttl=`. A cache never stops a run: an unreadable file is moved aside and rebuilt, an
unusable location turns the cache off, both with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from deepretrieval.cache_store import SQLiteStore
from deepretrieval.search.base import SearchResult

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_TTL_S = 7 * 24 * 3600.0
_WS = re.compile(r"\s+")


def default_cache_path() -> Path:
    from deepretrieval.paths import cache_root

    return cache_root() / "search_cache.sqlite"


def normalize_query(query: str) -> str:
    """Collapse white space; nothing else (case and quoting change what PubMed matches)."""
    return _WS.sub(" ", query).strip()


def cache_key(engine: str, base_url: str, query: str, k: int, filters: Optional[Mapping[str, Any]] = None) -> str:
    """Hex SHA-256 of the canonical JSON of the request's identity (no credentials)."""
    clean = {str(name): value for name, value in sorted((filters or {}).items()) if value is not None}
    ident = [SCHEMA_VERSION, engine, base_url.rstrip("/"), normalize_query(query), int(k), clean]
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class SearchCache(SQLiteStore):
    """`get(key) -> SearchResult | None`, `put(key, result)`; counters in `stats()`.

    `ttl` (seconds; None: `DEFAULT_TTL_S`; `math.inf`: never) makes older entries misses.
    Safe to share between threads and processes (see `SQLiteStore`).
    """

    TABLE = "results"

    def __init__(self, path: Optional[Union[str, Path]] = None, ttl: Optional[float] = None, timeout: float = 30.0,
                 clock: Callable[[], float] = time.time):
        super().__init__(path if path is not None else default_cache_path(), table=self.TABLE,
                         ttl=DEFAULT_TTL_S if ttl is None else ttl, timeout=timeout, clock=clock, name="search cache")

    def get(self, key: str) -> Optional[SearchResult]:
        """The cached result for `key` (marked `cached=True`), or None on a miss."""
        return self.get_json(key, decode=_decode)

    def put(self, key: str, result: SearchResult) -> None:
        """Store a successful result; failed and self-contradicting ones are ignored."""
        if not self.enabled or result.error is not None:
            return
        if (result.total or 0) > 0 and not result.ids:
            logger.warning("search cache: not storing %s result with total %d but no ids", result.engine, result.total)
            return
        data = result.to_dict()
        data["cached"] = False
        data["elapsed_s"] = 0.0
        self.put_json(key, data)


def _decode(data: Any) -> SearchResult:
    """A stored entry -> SearchResult; TypeError for anything not written by `put`."""
    if not isinstance(data, dict) or not isinstance(data.get("ids"), list) \
            or not isinstance(data.get("total"), (int, type(None))):  # None: not counted
        raise TypeError("not a stored search result")
    result = SearchResult.from_dict(data)
    result.cached = True
    return result


def resolve_cache(cache: Union[bool, None, str, Path, SearchCache], ttl: Optional[float] = None) -> Optional[SearchCache]:
    """Engines' `cache=` option: True -> default file, False/None -> off, path -> that file."""
    if cache is None or cache is False:
        return None
    if isinstance(cache, SearchCache):
        return cache
    if cache is True:
        return SearchCache(ttl=ttl)
    return SearchCache(path=cache, ttl=ttl)
