#!/usr/bin/env python
"""Start-up time of the `deepretrieval` command: wall time of whole CLI calls, and which heavy
modules each one imports.

    python scripts/bench_cli_startup.py [--repeats 7] [--before /path/to/old/code]

Runs each command `--repeats` times in a fresh interpreter (interleaved, so machine load hits
every variant alike) and prints the median wall time. With `--before DIR` (a `code/` folder of
an older revision, e.g. `git archive <commit> code | tar -x -C /tmp/old`) the same commands run
against that code too, and the ratio before/after is printed. The trials_sigir index is built in
a temporary cache before timing, so no timed call builds it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "ray", "pandas", "pyarrow", "numpy", "requests", "vllm")

COMMANDS: Dict[str, List[str]] = {
    "--version": ["--version"],
    "search --help": ["search", "--help"],
    "search (local, k=10)": ["search", "--index", "trials_sigir", '"heart failure" AND diuretic*', "--k", "10"],
}

PROBE = ("import sys, runpy; sys.argv = ['deepretrieval'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('deepretrieval', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "print(' '.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)")


def run_once(code_dir: Path, argv: List[str], env: Dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "deepretrieval", *argv], env={**env, "PYTHONPATH": str(code_dir)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def heavy_imports(code_dir: Path, argv: List[str], env: Dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(code_dir)}, check=False)
    return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--before", type=Path, default=None, help="code/ folder of the revision to compare with")
    args = parser.parse_args()

    variants = {"after": ROOT / "code"}
    if args.before is not None:
        variants = {"before": args.before.resolve(), **variants}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "DEEPRETRIEVAL_CACHE_DIR": cache}
        run_once(ROOT / "code", COMMANDS["search (local, k=10)"], env)  # builds the index once
        times: Dict[tuple, List[float]] = {}
        for _ in range(args.repeats):
            for name, argv in COMMANDS.items():
                for variant, code_dir in variants.items():
                    times.setdefault((name, variant), []).append(run_once(code_dir, argv, env))
        print(f"median wall time of {args.repeats} calls (python {sys.version.split()[0]}, "
              f"load average {os.getloadavg()[0]:.1f})")
        for name, argv in COMMANDS.items():
            cells = []
            for variant, code_dir in variants.items():
                median = statistics.median(times[(name, variant)])
                cells.append(f"{variant} {median:.2f} s [imports: {heavy_imports(code_dir, argv, env) or '-'}]")
            line = f"  {name:<22} " + " | ".join(cells)
            if len(variants) == 2:
                before = statistics.median(times[(name, "before")])
                after = statistics.median(times[(name, "after")])
                line += f" | before/after {before / after:.1f}x"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
