"""One persistent key -> JSON-value store on SQLite, shared by threads and processes.

Both caches of the project are this store: the search cache (`search/cache.py:SearchCache`,
entries expire) and the LLM answer cache (`eval/llm_client.py:AnswerCache`, entries kept for
ever). Each user chooses its keys and how a value is (de)serialised; everything else is here:

- Concurrency: one SQLite file in WAL mode (readers never block the writer; one writer at a
  time, others wait on `busy_timeout`). Each thread, and each forked process, opens its own
  connection; a lock guards only the counters.
- Expiry: an entry older than `ttl` seconds is a miss (the caller fetches again and overwrites
  it); `ttl=math.inf` keeps entries for ever. Age is measured on `clock` (wall clock; tests pass
  a fake one); an entry stamped more than five minutes in the future (the clock stepped back)
  counts as expired too.
- Failure policy: a cache never stops a run. A file that SQLite cannot read as a database is
  moved aside (`<name>.corrupt-<time>-<pid>`) and rebuilt, with a warning; if even that fails,
  or the location is unusable, the store turns itself off for the process, again with a warning.
  A read or write locked out past `busy_timeout` is a miss / a skipped write, counted in
  `errors`. An entry that cannot be decoded is a miss.
- Table layout: `(key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)`. A table of
  an older layout is adapted when opened: a missing `created` column is added (old entries are
  stamped 0, i.e. expired under any finite ttl), and a table with another required column is
  rebuilt empty.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

logger = logging.getLogger(__name__)

FUTURE_SLACK_S = 300.0  # stamps this far ahead of the clock are from a clock that stepped back
COLUMNS = ("key", "value", "created")


class SQLiteStore:
    """`put_json(key, value)`, `get_json(key, decode) -> value | None`; counters in `stats()`.

    `name` only labels log messages ("search cache"); `table` is the SQLite table.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"], table: str = "entries", ttl: float = math.inf,
                 timeout: float = 30.0, clock: Callable[[], float] = time.time, name: str = "cache"):
        if not table.isidentifier():
            raise ValueError(f"table name must be an identifier, got {table!r}")
        self.path = Path(path).expanduser()
        self.table = table
        self.ttl = float(ttl)
        if not self.ttl > 0:  # also NaN
            raise ValueError(f"cache ttl must be a positive number of seconds (math.inf: never expire), got {ttl!r}")
        self.name = name
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
        return f"{type(self).__name__}(path={str(self.path)!r}, ttl={self.ttl}, enabled={self.enabled})"

    # -- connections -------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode and str(mode[0]).lower() != "wal":
            logger.debug("%s %s: journal_mode is %s", self.name, self.path, mode[0])
        conn.execute("PRAGMA synchronous=NORMAL")
        self._ensure_table(conn)
        conn.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM {self.table} LIMIT 1)").fetchone()
        return conn

    def _ensure_table(self, conn: sqlite3.Connection) -> None:
        """Create the table, or adapt one of an older layout (see the module docstring)."""
        create = (f"CREATE TABLE IF NOT EXISTS {self.table} ("
                  " key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)")
        conn.execute(create)
        info = conn.execute(f"PRAGMA table_info({self.table})").fetchall()  # cid, name, type, notnull, default, pk
        names = {row[1] for row in info}
        blocking = [row[1] for row in info if row[1] not in COLUMNS and row[3] and row[4] is None]
        if blocking or not {"key", "value"} <= names:
            logger.info("%s %s: table %s has an older layout (%s); rebuilding it empty",
                        self.name, self.path, self.table, sorted(names))
            conn.execute(f"DROP TABLE IF EXISTS {self.table}")
            conn.execute(create)
        elif "created" not in names:
            conn.execute(f"ALTER TABLE {self.table} ADD COLUMN created REAL NOT NULL DEFAULT 0")

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
        """Move an unreadable file aside and start a fresh one; else switch off."""
        with self._lock:
            self.errors += 1
            self._local.conn = None
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{os.getpid()}")
            logger.warning("%s %s is unreadable (%s); moving it to %s and rebuilding", self.name, self.path, exc, aside)
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
            logger.warning("%s %s disabled for this run: %s", self.name, self.path, exc)
        self.enabled = False

    def _execute(self, sql: str, params: tuple, what: str) -> Optional[sqlite3.Cursor]:
        """Run one statement; a locked database is logged and counted (None), a corrupt one
        is recovered from once (then the store switches off)."""
        for attempt in range(2):
            if not self.enabled:
                return None
            try:
                return self._conn().execute(sql, params)
            except sqlite3.OperationalError as exc:  # locked past busy_timeout: a miss, not a crash
                logger.warning("%s %s failed (%s); carrying on without it", self.name, what, exc)
                with self._lock:
                    self.errors += 1
                return None
            except sqlite3.DatabaseError as exc:
                if attempt:
                    self._disable(exc)
                    return None
                self._recover(exc)
        return None

    # -- API -----------------------------------------------------------------------------
    def fresh(self, created: float) -> bool:
        """Whether an entry stamped `created` is young enough to be served."""
        age = self.clock() - created
        return -FUTURE_SLACK_S <= age <= self.ttl

    def get_json(self, key: str, decode: Optional[Callable[[Any], Any]] = None) -> Any:
        """The stored value for `key` (passed through `decode`), or None on a miss: absent,
        expired, or not decodable (`decode` raising ValueError, TypeError or KeyError)."""
        if not self.enabled:
            return None
        cur = self._execute(f"SELECT value, created FROM {self.table} WHERE key = ?", (key,), "read")
        row = cur.fetchone() if cur is not None else None
        value = None
        if row is not None and self.fresh(float(row[1])):
            try:
                value = json.loads(row[0])
                if decode is not None:
                    value = decode(value)
            except (ValueError, TypeError, KeyError) as exc:
                logger.warning("%s entry unreadable (%s); treating as a miss", self.name, exc)
                value = None
        with self._lock:
            if value is not None:
                self.hits += 1
            else:
                self.misses += 1
        return value

    def put_json(self, key: str, value: Any) -> bool:
        """Store `value` (JSON-serialisable) under `key`, stamped now; whether it was stored."""
        if not self.enabled:
            return False
        blob = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        cur = self._execute(f"INSERT OR REPLACE INTO {self.table} (key, value, created) VALUES (?, ?, ?)",
                            (key, blob, self.clock()), "write")
        if cur is None:
            return False
        with self._lock:
            self.puts += 1
        return True

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
            return int(self._conn().execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0])
        except sqlite3.Error:
            return 0

    def clear(self) -> None:
        """Delete every entry."""
        if self.enabled:
            self._execute(f"DELETE FROM {self.table}", (), "clear")

    def close(self) -> None:
        """Close this thread's connection (other threads' close when they are collected)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local.conn = None
