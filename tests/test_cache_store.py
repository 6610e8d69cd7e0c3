"""The shared SQLite key -> JSON store behind the search cache and the LLM answer cache:
WAL, expiry, recovery from corruption, an unusable location, locks, threads and processes."""

import logging
import math
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from deepretrieval.cache_store import SQLiteStore

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_round_trip_counters_and_wal(tmp_path):
    store = SQLiteStore(tmp_path / "s.sqlite", table="t")
    assert store.get_json("a") is None
    assert store.put_json("a", {"x": [1, "é"]}) is True
    assert store.get_json("a") == {"x": [1, "é"]}
    assert store.get_json("a", decode=lambda v: v["x"][0]) == 1
    assert store.stats() == {"hits": 2, "misses": 1, "hit_rate": 2 / 3, "puts": 1, "errors": 0, "enabled": 1.0}
    assert len(store) == 1 and SQLiteStore(tmp_path / "s.sqlite", table="t").get_json("a") == {"x": [1, "é"]}
    assert len(SQLiteStore(tmp_path / "s.sqlite", table="other")) == 0  # tables are separate
    store.clear()
    assert len(store) == 0
    mode = sqlite3.connect(tmp_path / "s.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    with pytest.raises(ValueError):
        SQLiteStore(tmp_path / "s.sqlite", table="t; DROP TABLE t")


def test_undecodable_entry_is_a_miss(tmp_path):
    store = SQLiteStore(tmp_path / "s.sqlite")
    store.put_json("a", {"x": 1})
    assert store.get_json("a", decode=lambda v: v["missing"]) is None
    assert store.stats()["misses"] == 1 and store.stats()["hits"] == 0


def test_expiry_on_the_store_clock(tmp_path):
    clock = Clock()
    store = SQLiteStore(tmp_path / "s.sqlite", ttl=10, clock=clock)
    store.put_json("a", 1)
    clock.now += 10
    assert store.get_json("a") == 1  # exactly ttl old: fresh
    clock.now += 0.5
    assert store.get_json("a") is None
    store.put_json("a", 2)
    assert store.get_json("a") == 2
    clock.now -= 301  # stamped more than five minutes in the future: the clock stepped back
    assert store.get_json("a") is None
    forever = SQLiteStore(tmp_path / "f.sqlite", clock=clock)
    assert forever.ttl == math.inf
    forever.put_json("b", 3)
    clock.now += 1e12
    assert forever.get_json("b") == 3
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="ttl"):
            SQLiteStore(tmp_path / "x.sqlite", ttl=bad)


def test_corrupt_file_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "c.sqlite"
    garbage = b"this is not a database" * 200
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING):
        store = SQLiteStore(path, name="my cache")
    assert store.enabled and "my cache" in caplog.text and "unreadable" in caplog.text
    aside = list(tmp_path.glob("c.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    assert store.stats()["errors"] == 1
    store.put_json("k", [9])
    assert store.get_json("k") == [9]


def test_file_corrupted_while_open_is_recovered(tmp_path):
    path = tmp_path / "c.sqlite"
    store = SQLiteStore(path)
    store.put_json("k", 1)
    store.close()  # the next call reopens, as a new thread or process would
    for side in (path.with_name("c.sqlite-wal"), path.with_name("c.sqlite-shm")):
        side.unlink(missing_ok=True)
    path.write_bytes(b"garbage!" * 1000)
    assert store.get_json("k") is None  # recovered: a miss
    assert store.enabled and len(list(tmp_path.glob("c.sqlite.corrupt-*"))) == 1
    store.put_json("k", 2)
    assert store.get_json("k") == 2


def test_directory_in_the_way_is_moved_aside(tmp_path):
    path = tmp_path / "c.sqlite"
    path.mkdir()
    store = SQLiteStore(path)
    store.put_json("k", 1)
    assert store.get_json("k") == 1 and path.is_file()


def test_unusable_location_disables_the_store_but_run_goes_on(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING):
        store = SQLiteStore(blocker / "sub" / "c.sqlite")
    assert not store.enabled and "disabled" in caplog.text
    assert store.put_json("k", 1) is False
    assert store.get_json("k") is None and len(store) == 0
    store.clear()


def test_locked_database_skips_the_write(tmp_path, caplog):
    path = tmp_path / "c.sqlite"
    store = SQLiteStore(path, timeout=0.05)
    store.put_json("a", 1)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with caplog.at_level(logging.WARNING):
            assert store.put_json("b", 2) is False
        assert store.get_json("a") == 1  # WAL: readers are not blocked
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.stats()["errors"] == 1 and "write failed" in caplog.text and store.enabled
    assert store.put_json("b", 2) is True


def test_table_of_an_older_layout(tmp_path):
    path = tmp_path / "c.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE kept (key TEXT PRIMARY KEY, value TEXT NOT NULL)")  # no `created`
    conn.execute("INSERT INTO kept VALUES ('a', '1')")
    conn.execute("CREATE TABLE rebuilt (key TEXT PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL)")
    conn.execute("INSERT INTO rebuilt VALUES ('a', 'x', '1')")
    conn.commit()
    conn.close()
    assert SQLiteStore(path, table="kept").get_json("a") == 1  # kept for ever: stamp 0 is fine
    assert SQLiteStore(path, table="kept", ttl=60).get_json("a") is None  # stamp 0: expired
    rebuilt = SQLiteStore(path, table="rebuilt")
    assert len(rebuilt) == 0 and rebuilt.put_json("b", 2) and rebuilt.get_json("b") == 2


def test_threads_share_one_store(tmp_path):
    store = SQLiteStore(tmp_path / "c.sqlite")
    errors = []

    def work(t):
        try:
            for i in range(40):
                store.put_json(f"{t}-{i}", [t, i])
                assert store.get_json(f"{t}-{i}") == [t, i]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(store) == 240 and store.stats()["hits"] == 240 and store.stats()["puts"] == 240


def test_processes_share_one_store(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'code')!r})
        from deepretrieval.cache_store import SQLiteStore
        store = SQLiteStore({str(tmp_path / 'c.sqlite')!r})
        me = int(sys.argv[1])
        for i in range(60):
            store.put_json(f"{{me}}-{{i}}", i)
            other = store.get_json(f"{{(me + 1) % 3}}-{{i}}")
            assert other is None or other == i
        assert store.stats()["errors"] == 0, store.stats()
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)]) for n in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    store = SQLiteStore(tmp_path / "c.sqlite")
    assert len(store) == 180 and store.get_json("2-59") == 59
