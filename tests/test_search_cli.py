"""`deepretrieval index build` / `deepretrieval search`: output shapes and exit codes."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from deepretrieval.cli import main
from deepretrieval.search.local_index import INDEX_META_FILE

FIXTURES = Path(__file__).parent / "fixtures" / "search"
SMALL = FIXTURES / "small_corpus.jsonl"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "idx"
    assert main(["index", "build", "--corpus", str(SMALL), "--out", str(out), "--no-progress"]) == 0
    return out


def run_json(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def test_search_json_success(small_index, capsys):
    code, obj, err = run_json(capsys, "search", "--engine", "local", "--index", str(small_index), "--k", "100",
                              "--json", "--total", "aspirin AND NOT stroke")
    assert code == 0 and obj["error"] is None
    assert set(obj["ids"]) == {"d2", "d7"} and obj["total"] == 2 and len(obj["scores"]) == 2


def test_search_date_filters(small_index, capsys):
    code, obj, _ = run_json(capsys, "search", "--index", str(small_index), "--json", "--min-date", "2004/01/01",
                            "--max-date", "2008/12/31", "aspirin")
    assert code == 0 and set(obj["ids"]) == {"d2", "d3"}


def test_malformed_query_exit_1_with_error_json(small_index, capsys):
    code, obj, err = run_json(capsys, "search", "--index", str(small_index), "--json", "aspirin[tiabx]")
    assert code == 1
    assert obj["error"]["type"] == "query_syntax" and "unknown field tag [tiabx]" in obj["error"]["message"]
    assert obj["ids"] == [] and obj["total"] == 0
    assert len(err.strip().splitlines()) == 1 and "position 7" in err


def test_missing_index_exit_3(tmp_path, capsys):
    code, obj, err = run_json(capsys, "search", "--index", str(tmp_path / "nope"), "--json", "aspirin")
    assert code == 3 and obj["error"]["type"] == "search_unavailable"


def test_usage_errors_exit_2(small_index, capsys):
    assert main(["search", "--engine", "local", "aspirin"]) == 2  # no --index
    assert main(["search", "--index", str(small_index), "--min-date", "soon", "aspirin"]) == 2
    assert main(["search", "--index", str(small_index)]) == 2  # no query
    assert "error:" in capsys.readouterr().err


def test_readable_output_and_query_file(small_index, tmp_path, capsys):
    qfile = tmp_path / "q.txt"
    qfile.write_text("aspirin[ti]\n\nstroke[ti]\n\n#1 AND #2\n")
    assert main(["search", "--index", str(small_index), "--query-file", str(qfile)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "top 1 (matching documents not counted; --total counts them):"
    assert "d1" in out.splitlines()[1]
    assert main(["search", "--index", str(small_index), "--k", "0", "--total", "aspirin[ti]"]) == 0
    assert capsys.readouterr().out.splitlines() == ["4 matching documents; top 0:"]  # d1, d2, d3, d7 by hand


def test_build_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert main(["index", "build", "--corpus", str(bad), "--out", str(tmp_path / "idx"), "--no-progress"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_live_engine_options_are_passed(monkeypatch, capsys):
    from deepretrieval.search import base
    from deepretrieval.search.base import SearchEngine, SearchResult

    seen = {}

    class Fake(SearchEngine):
        name = "fake"

        def __init__(self, **options):
            seen.update(options)

        def search(self, query, k=100, **filters):
            seen["filters"] = filters
            return SearchResult(ids=["1"], total=1, scores=[1.0], query=query, engine="pubmed", k=k)

    monkeypatch.setitem(base.ENGINES, "pubmed", lambda **kw: Fake(**kw))
    code, obj, _ = run_json(capsys, "search", "--engine", "pubmed", "--base-url", "http://x", "--no-cache",
                            "--max-date", "2020/01/01", "--json", "aspirin")
    assert code == 0 and obj["ids"] == ["1"]
    assert seen == {"base_url": "http://x", "cache": False, "filters": {"max_date": "2020/01/01"}}


def test_subprocess_no_traceback(small_index):
    cmd = [sys.executable, "-m", "deepretrieval", "search", "--engine", "local", "--index", str(small_index),
           "--k", "100", "--json", "(aspirin AND"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert json.loads(proc.stdout)["error"]["type"] == "query_syntax"


def test_search_index_by_corpus_name(tmp_path, monkeypatch, capsys, caplog, trials_sigir_index):
    """`--index trials_sigir` builds the vendored corpus's index in the cache once, then reuses it;
    its answers equal those of an index built directly from the corpus."""
    monkeypatch.setenv("DEEPRETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # no folder named trials_sigir here
    query = '"heart failure" AND (diuretic* OR furosemide)'
    caplog.set_level(logging.INFO, logger="deepretrieval")
    code, first, err = run_json(capsys, "search", "--index", "trials_sigir", "--k", "20", "--json", query)
    assert code == 0 and "building local index 'trials_sigir'" in caplog.text
    caplog.clear()
    assert (tmp_path / "cache" / "indexes" / "trials_sigir" / INDEX_META_FILE).is_file()
    code, again, err = run_json(capsys, "search", "--index", "trials_sigir", "--k", "20", "--json", query)
    assert code == 0 and "building" not in caplog.text and again["ids"] == first["ids"]
    code, direct, _ = run_json(capsys, "search", "--index", str(trials_sigir_index), "--k", "20", "--json", query)
    assert first["ids"] == direct["ids"] and first["total"] is None and len(first["ids"]) > 0
