"""Time the adversarial answers and queries of issue #19 (reward path), each in its own process
with a timeout, and print one table row per case (seconds and outcome) plus scaling ratios.

    PYTHONPATH=code python scripts/bench_reward_hardening.py            # this checkout
    PYTHONPATH=/path/to/old/code python scripts/bench_reward_hardening.py --timeout 60   # before

`--index DIR` points at a built pubmed_mini index (default: the vendored corpus, built in the
cache on first use). Cases that do not finish within `--timeout` seconds print "> timeout".
Numbers depend on the machine and its load; the ratios (time at 4x the size / time at 1x) show
the growth: ~4 linear, ~16 quadratic, ~64 cubic.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import string
import time
from typing import Callable, Dict, List, Tuple

LETTERS = string.ascii_lowercase


def _answer(text: str) -> Callable[[], Tuple[str, str]]:
    """Each case prepares outside the timer (imports, opening the index) and returns what is timed."""
    from deepretrieval.rewards.parsing import parse_answer

    def job() -> Tuple[str, str]:
        parsed = parse_answer(text)
        return parsed.error, parsed.detail[:60]

    return job


def _query(query: str) -> Callable[[], Tuple[str, str]]:
    from deepretrieval.search.query import parse

    def job() -> Tuple[str, str]:
        parse(query)
        return "parsed", ""

    return job


def _local(args: Tuple[str, str]) -> Callable[[], Tuple[str, str]]:
    from deepretrieval.search.local import LocalSearchEngine

    index_dir, query = args
    engine = LocalSearchEngine(index_dir)
    engine.search("aspirin", k=1)  # warm: the first search of a process pays for loading the index

    def job() -> Tuple[str, str]:
        res = engine.search(query, k=100)
        return "ok", f"total={res.total}"

    return job


def _worker(fn: Callable, arg, queue) -> None:
    job = fn(arg)
    start = time.perf_counter()
    try:
        outcome = job()
    except BaseException as exc:  # the point is to see what raises
        outcome = (f"raises {type(exc).__name__}", str(exc)[:60])
    queue.put((time.perf_counter() - start, outcome))


def run_case(fn: Callable, arg, timeout: float) -> Tuple[float, str]:
    queue: mp.Queue = mp.Queue()
    proc = mp.Process(target=_worker, args=(fn, arg, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return float("inf"), "> timeout"
    seconds, (kind, detail) = queue.get()
    return seconds, f"{kind} {detail}".strip()


def cases(index_dir: str) -> List[Tuple[str, str, Callable, Dict[str, object]]]:
    """(family, label, function, {size label: argument})."""
    deep_json = '<answer>{{"query": "a", "x": {0}{1}}}</answer>'
    return [
        ("JSON nested n deep", "answer", _answer,
         {n: deep_json.format("[" * n, "]" * n) for n in (1_000, 4_000)}),
        ("JSON integer of n digits", "answer", _answer,
         {n: '<answer>{"query": "a", "x": ' + "1" * n + "}</answer>" for n in (5_000, 20_000)}),
        ("code fence + n spaces", "answer", _answer,
         {n: "<answer>```" + " " * n + "x</answer>" for n in (500, 2_000)}),
        ("n unclosed <answer> tags", "answer", _answer, {n: "<answer>" * n for n in (5_000, 20_000)}),
        ("query of n chars (a OR a ...)", "query", _query,
         {n: ("a OR " * (n // 5))[:-4] for n in (250_000, 1_000_000)}),
        ("n nested parentheses", "query", _query, {n: "(" * n + "a" + ")" * n for n in (400, 1_600)}),
        ("n chained NOTs (local)", "local", _local,
         {n: (index_dir, "a" + " NOT b" * n) for n in (500, 2_000)}),
        ("n OR-ed wildcard phrases (local)", "local", _local,
         {n: (index_dir, " OR ".join(f'"{LETTERS[i % 26]}* {LETTERS[(i * 7 + 3) % 26]}*"' for i in range(n)))
          for n in (16, 64)}),
        ("adj chain of n words (local)", "local", _local,
         {n: (index_dir, "(" + " adj2 ".join(["aspirin"] * n) + ").tw.") for n in (16, 18)}),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    ap.add_argument("--index", default=None, help="pubmed_mini index directory")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    index_dir = args.index
    if index_dir is None:
        from deepretrieval.search.local_index import ensure_local_index

        index_dir = str(ensure_local_index("pubmed_mini"))
    rows = []
    print(f"{'case':36s} {'n':>9s} {'seconds':>9s}  outcome")
    for family, _, fn, sizes in cases(index_dir):
        times = []
        for n, arg in sizes.items():
            seconds, outcome = run_case(fn, arg, args.timeout)
            times.append(seconds)
            rows.append({"case": family, "n": n, "seconds": seconds, "outcome": outcome})
            shown = f"{seconds:9.3f}" if seconds != float("inf") else f"{'>' + str(int(args.timeout)):>9s}"
            print(f"{family:36s} {n:9d} {shown}  {outcome}", flush=True)
        small, large = times
        if small > 0.01 and large != float("inf"):
            print(f"{'':36s} {'ratio':>9s} {large / small:9.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
