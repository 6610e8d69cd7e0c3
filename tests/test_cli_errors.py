"""`deepretrieval search` / `index build`: every bad input or engine failure is one `error:` line on
stderr with its documented exit code, never a traceback (issue 19, "Local engine and CLI")."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepretrieval.cli import main
from deepretrieval.search import base
from deepretrieval.search.base import SearchEngine, SearchUnavailable
from deepretrieval.search.cli import MAX_K, MAX_QUERY_FILE_BYTES
from deepretrieval.search.local import LocalSearchEngine
from deepretrieval.search.local_index import INDEX_META_FILE, build_index

FIXTURES = Path(__file__).parent / "fixtures" / "search"
SMALL = FIXTURES / "small_corpus.jsonl"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_errors") / "idx"
    build_index(SMALL, out, progress=False)
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ----------------------------------------------------------------------------- queries

@pytest.mark.parametrize("query", [
    "(" * 400 + "aspirin" + ")" * 400,
    "(" * 5000 + "aspirin" + ")" * 5000,
    "aspirin" + " NOT stroke" * 600,
    "aspirin" + " AND (stroke" * 700 + ")" * 700,
])
def test_deep_queries_are_query_errors(index, capsys, query):
    code, out, err = run(capsys, "search", "--index", index, query)
    assert code == 1 and out == ""
    assert_one_error_line(err, "query syntax error")
    code, out, err = run(capsys, "search", "--index", index, "--json", query)
    assert code == 1 and json.loads(out)["error"]["type"] == "query_syntax"


def test_engine_failures_of_any_kind_are_one_line(monkeypatch, capsys):
    class PanicException(BaseException):
        """Stands in for pyo3's PanicException (a BaseException, as a Rust panic is in Python)."""

    failures = {"type": TypeError("unsupported operand"), "panic": PanicException("rust panicked"),
                "overflow": OverflowError("int too big to convert"), "memory": MemoryError()}

    class Broken(SearchEngine):
        name = "broken"

        def __init__(self, **options):
            pass

        def search(self, query, k=100, **filters):
            raise failures[query]

    monkeypatch.setitem(base.ENGINES, "pubmed", lambda **kw: Broken(**kw))
    for query, exc in failures.items():
        code, out, err = run(capsys, "search", "--engine", "pubmed", "--json", query)
        assert code == 70, query
        assert_one_error_line(err, "internal error", type(exc).__name__)
        assert json.loads(out)["error"]["type"] == "internal_error"


def test_unavailable_engine_is_exit_3(monkeypatch, capsys):
    def refuse(**options):
        raise SearchUnavailable("service down")

    monkeypatch.setitem(base.ENGINES, "pubmed", refuse)
    code, _, err = run(capsys, "search", "--engine", "pubmed", "aspirin")
    assert code == 3
    assert_one_error_line(err, "search unavailable: service down")


# ----------------------------------------------------------------------------- query files

def test_query_file_errors(index, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    big = tmp_path / "big.txt"
    big.write_bytes(b"a OR " * (MAX_QUERY_FILE_BYTES // 5 + 1))
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n")
    cases = {
        tmp_path / "missing.txt": "No such file or directory",
        latin1: "not UTF-8 text (byte 3",
        tmp_path: "Is a directory",
        big: f"larger than {MAX_QUERY_FILE_BYTES:,} bytes",
        blank: "no query given",
    }
    for path, fragment in cases.items():
        code, out, err = run(capsys, "search", "--index", index, "--query-file", path)
        assert code == 2 and out == "", path
        assert_one_error_line(err, fragment)


def test_query_argument_errors(index, tmp_path, capsys):
    q = tmp_path / "q.txt"
    q.write_text("aspirin")
    code, _, err = run(capsys, "search", "--index", index, "--query-file", q, "stroke")
    assert code == 2
    assert_one_error_line(err, "not both")
    code, _, err = run(capsys, "search", "--index", index, "aspirin \udcff")  # how Python passes a non-UTF-8 argv byte
    assert code == 2
    assert_one_error_line(err, "the query is not UTF-8 text (character 8)")


def test_query_file_utf8_with_bom_reads(index, tmp_path, capsys):
    q = tmp_path / "q.txt"
    q.write_bytes("\ufeffaspirin[ti] AND café".encode("utf-8"))
    code, out, _ = run(capsys, "search", "--index", index, "--json", "--query-file", q)
    assert code == 0 and json.loads(out)["query"] == "aspirin[ti] AND café"


def test_stdin_query_not_utf8_subprocess(index):
    cmd = [sys.executable, "-m", "deepretrieval", "search", "--index", str(index), "--query-file", "-"]
    proc = subprocess.run(cmd, input=b"\xff\xfe aspirin", capture_output=True, cwd=ROOT, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "code")})
    assert proc.returncode == 2 and proc.stdout == b""
    assert_one_error_line(proc.stderr.decode(), "standard input is not UTF-8")


# ----------------------------------------------------------------------------- k and dates

@pytest.mark.parametrize("k", [-1, MAX_K + 1, 10**12, 2**64, -(10**40)])
def test_k_out_of_range_is_usage_error(index, capsys, k):
    code, out, err = run(capsys, "search", "--index", index, "--k", k, "aspirin")
    assert code == 2 and out == ""
    assert_one_error_line(err, f"--k must be between 0 and {MAX_K:,}")


def test_k_bounds_are_accepted(index, capsys):
    # the fixture's documents that mention aspirin, counted from the file itself
    n = sum("aspirin" in line.lower() for line in SMALL.read_text().splitlines())
    for k, expected in ((0, 0), (MAX_K, n)):
        code, out, _ = run(capsys, "search", "--index", index, "--json", "--total", "--k", k, "aspirin")
        obj = json.loads(out)
        assert code == 0 and len(obj["ids"]) == expected and obj["total"] == n


@pytest.mark.parametrize("flag,value", [
    ("--min-date", "2020/13/45"), ("--min-date", "2020/00/10"), ("--max-date", "2021/02/29"),
    ("--max-date", "2020/04/31"), ("--min-date", "2020/1/1x"), ("--min-date", "20"), ("--max-date", "soon"),
    ("--min-date", "2020-01/05"),
])
def test_impossible_dates_are_usage_errors(index, capsys, flag, value):
    code, out, err = run(capsys, "search", "--index", index, flag, value, "aspirin")
    assert code == 2 and out == ""
    assert_one_error_line(err, f"{flag} {value!r} is not a valid date")


def test_date_order_and_leap_day(index, capsys):
    code, _, err = run(capsys, "search", "--index", index, "--min-date", "2008", "--max-date", "2004", "aspirin")
    assert code == 2
    assert_one_error_line(err, "--min-date 2008 is after --max-date 2004")
    # a real leap day, and "-" / "." separators, are accepted; d3 (2007/11) is inside, d2 (2005) is not
    code, out, _ = run(capsys, "search", "--index", index, "--json", "--min-date", "2006-01-01",
                       "--max-date", "2008.02.29", "aspirin")
    assert code == 0 and json.loads(out)["ids"] == ["d3"]


def test_engine_rejects_impossible_date_filters(index):
    engine = LocalSearchEngine(index)
    with pytest.raises(ValueError, match="invalid date filter"):
        engine.search("aspirin", min_date="2020/13/45")
    with pytest.raises(ValueError, match="invalid date filter"):
        engine.search("aspirin", max_date="2019/02/29")
    assert set(engine.search("aspirin", max_date="2004/02/29").ids) == {"d1", "d7"}  # 2001, 2003


def test_impossible_dp_date_in_a_query_is_a_syntax_error(index, capsys):
    code, out, err = run(capsys, "search", "--index", index, "--json", "aspirin AND 2001/02/30[dp]")
    assert code == 1 and json.loads(out)["error"]["type"] == "query_syntax"
    assert "invalid publication date" in err


# ----------------------------------------------------------------------------- index metadata

@pytest.mark.parametrize("content,fragment", [
    (b"[1, 2, 3]", "holds a JSON list, not an object"),
    (b'"index"', "holds a JSON str, not an object"),
    (b"null", "holds a JSON NoneType, not an object"),
    (b'{"num_docs": "many"}', "'num_docs' is a str"),
    (b'{"text_fields": 5}', "'text_fields' is a int"),
    (b'{"text_fields": [1, 2]}', "'text_fields' must list field names"),
    (b'{"format_version": true}', "'format_version' is a bool"),
    (b"{not json", "is unreadable (JSONDecodeError"),
    (b'{"a": "\xff"}', "is unreadable (UnicodeDecodeError"),
    (b"[" * 100_000, "is unreadable (RecursionError"),
])
def test_damaged_index_metadata_is_unavailable(index, tmp_path, capsys, content, fragment):
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    (copy / INDEX_META_FILE).write_bytes(content)
    with pytest.raises(SearchUnavailable, match="rebuild it"):
        LocalSearchEngine(copy)
    code, out, err = run(capsys, "search", "--index", copy, "--json", "aspirin")
    assert code == 3 and json.loads(out)["error"]["type"] == "search_unavailable"
    assert_one_error_line(err, "search unavailable", fragment)


def test_damaged_vendored_index_is_rebuilt(tmp_path, monkeypatch, capsys):
    from deepretrieval.search import local_index as paths

    monkeypatch.setenv("DEEPRETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(paths.LOCAL_CORPORA, "tiny_fixture", str(SMALL))
    built = paths.ensure_local_index("tiny_fixture")
    (built / INDEX_META_FILE).write_text("[]")
    assert not paths.index_ready(built)
    assert paths.ensure_local_index("tiny_fixture") == built and paths.index_ready(built)
    assert LocalSearchEngine(built).num_docs == 8


# ----------------------------------------------------------------------------- index build arguments

@pytest.mark.parametrize("flag,value,fragment", [
    ("--batch-size", 0, "--batch-size must be >= 1"), ("--heap-mb", 10**30, "--heap-mb must be between 15"),
    ("--heap-mb", 1, "--heap-mb must be between 15"), ("--threads", -2, "--threads must be between 0"),
    ("--limit", 0, "--limit must be >= 1"),
])
def test_build_argument_ranges(tmp_path, capsys, flag, value, fragment):
    code, out, err = run(capsys, "index", "build", "--corpus", SMALL, "--out", tmp_path / "idx", "--no-progress",
                         flag, value)
    assert code == 2 and out == "" and not (tmp_path / "idx").exists()
    assert_one_error_line(err, fragment)


# ----------------------------------------------------------------------------- the last resort

def test_unexpected_errors_in_any_command_are_one_line(monkeypatch, tmp_path, capsys):
    import deepretrieval.search.cli as search_cli

    def boom(args):
        raise RuntimeError("something\nbroke " + "x" * 2000)

    monkeypatch.setattr(search_cli, "cmd_index_build", boom)
    code, out, err = run(capsys, "index", "build", "--corpus", SMALL, "--out", tmp_path / "i")
    assert code == 70
    assert_one_error_line(err, "internal error: RuntimeError: something broke", "rerun with -v")
    assert len(err) < 600

    def disk_full(args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(search_cli, "cmd_index_build", disk_full)
    code, out, err = run(capsys, "index", "build", "--corpus", SMALL, "--out", tmp_path / "i")
    assert code == 1
    assert_one_error_line(err, "No space left on device")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(search_cli, "cmd_index_build", interrupted)
    code, out, err = run(capsys, "index", "build", "--corpus", SMALL, "--out", tmp_path / "i")
    assert code == 130
    assert_one_error_line(err, "interrupted")


def test_eval_bad_reward_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "reward.yaml"
    bad.write_text("reward: [unclosed\n")
    for config in (bad, tmp_path / "missing.json"):
        code = main(["eval", "--task", "trials_sigir", "--baseline", "original", "--limit", "1", "--out",
                     str(tmp_path / "out"), "--reward-config", str(config)])
        assert code == 2
        assert "Traceback" not in capsys.readouterr().err
