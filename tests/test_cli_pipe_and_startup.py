"""Process-level CLI behaviour: a closed output pipe ends every sub-command quietly (exit 141, no
traceback), and `search` / `index` start without importing torch, transformers, ray or pandas."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepretrieval.cli import EXIT_PIPE

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "tests" / "fixtures" / "search" / "small_corpus.jsonl"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "code")}
HEAVY = ("torch", "transformers", "ray", "pandas", "pyarrow", "numpy", "vllm", "requests")


def run_into_closed_pipe(argv, tmp_path, stderr_too=False):
    """Run `deepretrieval ARGV` with stdout on a pipe whose reader is already gone (`| head` once
    head has exited); with `stderr_too` stderr goes there as well (`2>&1 | head`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "wb") as err_file:
        proc = subprocess.run([sys.executable, "-m", "deepretrieval", *map(str, argv)], stdout=write_end,
                              stderr=write_end if stderr_too else err_file, cwd=tmp_path, env=ENV, timeout=300)
    os.close(write_end)
    return proc.returncode, err_path.read_text()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from deepretrieval.search.local_index import build_index

    out = tmp_path_factory.mktemp("cli_pipe") / "idx"
    build_index(SMALL, out, progress=False)
    return out


@pytest.mark.parametrize("argv", [
    ["search", "--index", "{index}", "aspirin OR stroke", "--k", "5"],
    ["search", "--index", "{index}", "--json", "aspirin"],
    ["search", "--index", "{index}", "(aspirin AND", "--json"],  # the error JSON on stdout
    ["index", "build", "--corpus", str(SMALL), "--out", "{tmp}/new_index", "--no-progress"],
    ["--help"], ["search", "--help"], ["index", "build", "--help"], ["prepare", "--help"], ["eval", "--help"],
    ["quickstart", "--help"], ["--version"],
])
def test_closed_stdout_exits_quietly(index, tmp_path, argv):
    argv = [a.format(index=index, tmp=tmp_path) for a in argv]
    code, err = run_into_closed_pipe(argv, tmp_path)
    assert code == EXIT_PIPE, err
    assert err == "" or "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    if "--out" in argv:
        assert (tmp_path / "new_index").is_dir()  # the build finished; only its report was lost


def test_closed_stdout_and_stderr_exit_quietly(index, tmp_path):
    code, _ = run_into_closed_pipe(["search", "--index", index, "aspirin"], tmp_path, stderr_too=True)
    assert code == EXIT_PIPE
    code, _ = run_into_closed_pipe(["search", "--index", index, "(aspirin AND"], tmp_path, stderr_too=True)
    assert code == EXIT_PIPE


def test_head_reads_first_lines(index, tmp_path):
    """The issue's case through a real shell pipe: `deepretrieval search ... | head -1`."""
    cmd = (f"{sys.executable} -m deepretrieval search --index {index} --k 100000 --total 'aspirin OR stroke' | head -1; "
           "echo rc=${PIPESTATUS[0]}")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=ENV, timeout=300)
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("matching documents; top " + lines[0].split()[0] + ":")
    assert lines[-1] in ("rc=0", f"rc={EXIT_PIPE}") and "Traceback" not in proc.stderr, proc.stderr


PROBE = """
import json, runpy, sys
sys.argv = ["deepretrieval"] + sys.argv[1:]
code = None
try:
    runpy.run_module("deepretrieval", run_name="__main__")
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
print(json.dumps({"code": code, "loaded": sorted(m for m in HEAVY if m in sys.modules)}), file=sys.stderr)
"""


def imported_by(argv, tmp_path):
    probe = PROBE.replace("HEAVY", repr(HEAVY))
    proc = subprocess.run([sys.executable, "-c", probe, *map(str, argv)], capture_output=True, text=True,
                          cwd=tmp_path, env={**ENV, "DEEPRETRIEVAL_CACHE_DIR": str(tmp_path / "cache")}, timeout=300)
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [
    ["--help"], ["search", "--help"], ["index", "build", "--help"], ["eval", "--help"],
    ["search", "--index", "{index}", "aspirin"],
    ["search", "--index", "{index}", "--json", "--min-date", "2001", "aspirin AND stroke[mh]"],
    ["index", "build", "--corpus", str(SMALL), "--out", "{tmp}/idx2", "--no-progress"],
])
def test_search_and_index_do_not_import_heavy_modules(index, tmp_path, argv):
    argv = [a.format(index=index, tmp=tmp_path) for a in argv]
    result = imported_by(argv, tmp_path)
    assert result["code"] in (0, None) and result["loaded"] == [], result


def test_lazy_eval_package_still_exports_its_names():
    code = ("import sys, deepretrieval.eval as e; assert 'deepretrieval.eval.runner' not in sys.modules; "
            "assert e.recall_at_k(['a', 'b'], {'a'}, 2) == 1.0 and 'baseline_query' in dir(e); "
            "assert callable(e.BaselineMethod)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
