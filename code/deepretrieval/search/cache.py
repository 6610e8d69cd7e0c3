"""Persistent cache of search results, shared by threads and processes.

One SQLite file in WAL mode (readers never block the writer; one writer at a time, others
wait on `busy_timeout`). An entry is keyed by a SHA-256 of the canonical JSON of

    (engine, base URL, normalised query, k, filters)

where the query is normalised by collapsing runs of white space (case is kept: PubMed
needs upper-case Boolean operators). Credentials are never part of a key. Only successful
results are stored: a service failure must be retried later, not replayed; so is a result
that contradicts itself (`total > 0` with no id), which only a glitch produces.

Expiry: an entry older than `ttl` seconds is a miss, re-fetched and overwritten by the
engine. Default `DEFAULT_TTL_S` (7 days: live indexes change daily, and a bad entry must
not outlive a week of training); `ttl=math.inf` keeps entries for ever. Engines take it as
`cache_ttl=`. Age is measured on the wall clock (`clock`, for tests); an entry stamped
more than five minutes in the future (the clock stepped back) is treated as expired too.

Failure policy: a cache never stops a run. A file that SQLite cannot read as a database is
moved aside (`<name>.corrupt-<time>`) and rebuilt, with a warning; if even that fails the
cache turns itself off for the process, again with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

from deepretrieval.search.base import SearchResult

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_TTL_S = 7 * 24 * 3600.0
_FUTURE_SLACK_S = 300.0  # stamps this far ahead of the clock are from a clock that stepped back
_WS = re.compile(r"\s+")


def default_cache_path() -> Path:
    from deepretrieval.data.paths import cache_root

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


class SearchCache:
    """`get(key) -> SearchResult | None`, `put(key, result)`; counters in `stats()`.

    `ttl` (seconds; None: `DEFAULT_TTL_S`; `math.inf`: never) makes older entries misses.
    Safe to share between threads; each thread (and each forked process) opens its own
    SQLite connection.
    """

    def __init__(self, path: Optional[Union[str, Path]] = None, ttl: Optional[float] = None, timeout: float = 30.0,
                 clock: Callable[[], float] = time.time):
        self.path = Path(path).expanduser() if path is not None else default_cache_path()
        self.ttl = DEFAULT_TTL_S if ttl is None else float(ttl)
        if not self.ttl > 0:  # also NaN
            raise ValueError(f"cache ttl must be a positive number of seconds (math.inf: never expire), got {ttl!r}")
        self.clock = clock
        self.timeout = timeout
        self.enabled = True
        self._local = threading.local()
        self._lock = threading.Lock()
        self._generation = 0  # bumped when the file is replaced: stale connections reopen
        self.hits = 0
        self.misses = 0
        self.puts = 0
        self.errors = 0
        self._open_checked()

    def __repr__(self) -> str:
        return f"SearchCache(path={str(self.path)!r}, ttl={self.ttl}, enabled={self.enabled})"

    # -- connections -------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode and str(mode[0]).lower() != "wal":
            logger.debug("search cache %s: journal_mode is %s", self.path, mode[0])
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS results ("
            " key TEXT PRIMARY KEY, engine TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)"
        )
        conn.execute("SELECT COUNT(*) FROM (SELECT 1 FROM results LIMIT 1)").fetchone()
        return conn

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        if (
            getattr(local, "conn", None) is None
            or local.pid != os.getpid()
            or local.generation != self._generation
        ):
            local.conn = self._connect()
            local.pid = os.getpid()
            local.generation = self._generation
        return local.conn

    def _open_checked(self) -> None:
        try:
            self._conn()
        except sqlite3.DatabaseError as exc:
            self._recover(exc)
        except OSError as exc:
            self._disable(exc)

    def _recover(self, exc: Exception) -> None:
        """Move an unreadable cache file aside and start a fresh one; else switch off."""
        with self._lock:
            self.errors += 1
            self._local.conn = None
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{os.getpid()}")
            logger.warning("search cache %s is unreadable (%s); moving it to %s and rebuilding", self.path, exc, aside)
            try:
                if self.path.exists():
                    os.replace(self.path, aside)
                for suffix in ("-wal", "-shm"):
                    side = self.path.with_name(self.path.name + suffix)
                    if side.exists():
                        os.replace(side, aside.with_name(aside.name + suffix))
                self._generation += 1
            except OSError as move_exc:
                self._disable(move_exc)
                return
        try:
            self._conn()
        except (sqlite3.DatabaseError, OSError) as again:
            self._disable(again)

    def _disable(self, exc: Exception) -> None:
        if self.enabled:
            logger.warning("search cache %s disabled for this run: %s", self.path, exc)
        self.enabled = False

    # -- API -----------------------------------------------------------------------------
    def get(self, key: str) -> Optional[SearchResult]:
        """The cached result for `key` (marked `cached=True`), or None on a miss."""
        if not self.enabled:
            return None
        row = None
        for attempt in range(2):
            try:
                row = self._conn().execute("SELECT value, created FROM results WHERE key = ?", (key,)).fetchone()
                break
            except sqlite3.OperationalError as exc:  # locked past busy_timeout: a miss, not a crash
                logger.warning("search cache read failed (%s); treating as a miss", exc)
                self.errors += 1
                break
            except sqlite3.DatabaseError as exc:
                if attempt:
                    self._disable(exc)
                    break
                self._recover(exc)
        hit = row is not None and self._fresh(float(row[1]))
        result = None
        if hit:
            try:
                result = SearchResult.from_dict(json.loads(row[0]))
                result.cached = True
            except (ValueError, TypeError) as exc:
                logger.warning("search cache entry unreadable (%s); treating as a miss", exc)
                result = None
        with self._lock:
            if result is not None:
                self.hits += 1
            else:
                self.misses += 1
        return result

    def _fresh(self, created: float) -> bool:
        age = self.clock() - created
        return -_FUTURE_SLACK_S <= age <= self.ttl

    def put(self, key: str, result: SearchResult) -> None:
        """Store a successful result; failed and self-contradicting ones are ignored."""
        if not self.enabled or result.error is not None:
            return
        if result.total > 0 and not result.ids:
            logger.warning("search cache: not storing %s result with total %d but no ids", result.engine, result.total)
            return
        data = result.to_dict()
        data["cached"] = False
        data["elapsed_s"] = 0.0
        value = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        for attempt in range(2):
            try:
                self._conn().execute(
                    "INSERT OR REPLACE INTO results (key, engine, value, created) VALUES (?, ?, ?, ?)",
                    (key, result.engine, value, self.clock()),
                )
                with self._lock:
                    self.puts += 1
                return
            except sqlite3.OperationalError as exc:
                logger.warning("search cache write failed (%s); result not cached", exc)
                self.errors += 1
                return
            except sqlite3.DatabaseError as exc:
                if attempt:
                    self._disable(exc)
                    return
                self._recover(exc)

    def stats(self) -> Dict[str, float]:
        """Counters for metrics: hits, misses, hit_rate, puts, errors, enabled."""
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": self.hits / lookups if lookups else 0.0,
                "puts": self.puts,
                "errors": self.errors,
                "enabled": float(self.enabled),
            }

    def __len__(self) -> int:
        if not self.enabled:
            return 0
        try:
            return int(self._conn().execute("SELECT COUNT(*) FROM results").fetchone()[0])
        except sqlite3.Error:
            return 0

    def clear(self) -> None:
        if self.enabled:
            self._conn().execute("DELETE FROM results")

    def close(self) -> None:
        """Close this thread's connection (other threads' close when they are collected)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local.conn = None


def resolve_cache(cache: Union[bool, None, str, Path, SearchCache], ttl: Optional[float] = None) -> Optional[SearchCache]:
    """Engines' `cache=` option: True -> default file, False/None -> off, path -> that file."""
    if cache is None or cache is False:
        return None
    if isinstance(cache, SearchCache):
        return cache
    if cache is True:
        return SearchCache(ttl=ttl)
    return SearchCache(path=cache, ttl=ttl)
