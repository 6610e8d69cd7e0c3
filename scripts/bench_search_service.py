#!/usr/bin/env python
"""Benchmark the search service (deepretrieval.search.service) against in-process search.

A reward-sized batch of distinct queries (default 512: bag-of-words topic titles and Boolean
queries of pubmed_mini, each with a few variants) is searched on the pubmed_mini index:
  in-process, one thread       engine.search per query (the reward with num_workers=1)
  in-process, thread pool      the reward manager's default for a local engine (min(4, CPUs) threads)
  service                      one `search_requests` call over the node's replicas (Ray actors)
Each is repeated (--repeats, median kept) after a warm-up; the answers are checked equal to the
in-process ones, and the times are printed with the ratios service / in-process. The replicas'
start (one-off per run) is printed separately.

Usage:  python scripts/bench_search_service.py [--queries 512] [--replicas 2] [--k 100] [--repeats 3]
        [--num-cpus N] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_search import BOOLEAN_QUERIES  # scripts/ (this script's folder is on sys.path)
from deepretrieval.search.base import make_engine
from deepretrieval.search.local_index import build_index

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT / "data" / "pubmed_mini"


def make_queries(n: int) -> list:
    """`n` distinct queries: topic titles (words OR-ed), the Boolean queries, and variants of both
    (a title-word subset, a [tiab] restriction, an extra AND term)."""
    titles = [json.loads(line)["title"] for line in (DATA / "topics.jsonl").read_text().splitlines() if line.strip()]
    words = [[w.strip("(),.:;'\"") for w in t.split() if len(w.strip("(),.:;'\"")) > 3] for t in titles]
    base = [" OR ".join(w) for w in words if w] + BOOLEAN_QUERIES
    extras = ["randomized", "trial", "cohort", "children", "adults", "placebo", "mortality", "therapy"]
    out, i = [], 0
    while len(out) < n:
        q = base[i % len(base)]
        variant = i // len(base)
        if variant % 3 == 1:
            q = f"({q}) AND {extras[(i + variant) % len(extras)]}"
        elif variant % 3 == 2:
            q = f"({q}) NOT {extras[(i + variant) % len(extras)]}[ti]"
        if variant >= 3:
            q = f"({q}) AND {extras[variant % len(extras)]}*"
        if q not in out:
            out.append(q)
        i += 1
    return out


def timed(fn, repeats: int) -> tuple:
    fn()  # warm-up (expansion caches, Ray workers' imports)
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import ray

    from deepretrieval.controller.ray_utils import init_ray
    from deepretrieval.search.service import SearchService, ServiceSettings

    queries = make_queries(args.queries)
    requests = [(q, args.k, {}) for q in queries]
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        index = Path(tmp) / "pubmed_mini"
        build_index(DATA / "corpus.jsonl.gz", index, progress=False)
        opener = functools.partial(make_engine, "local", index_dir=str(index))
        engine = opener()
        threads = max(1, min(4, os.cpu_count() or 1))
        one_thread, expected = timed(lambda: [engine.search(q, k=args.k) for q in queries], args.repeats)

        def pooled():
            with ThreadPoolExecutor(max_workers=threads) as pool:
                return list(pool.map(lambda q: engine.search(q, k=args.k), queries))

        pool_s, _ = timed(pooled, args.repeats)

        start = time.perf_counter()
        init_ray(num_cpus=args.num_cpus)
        ray_start_s = time.perf_counter() - start
        service = SearchService(ServiceSettings(replicas_per_node=args.replicas, timeout_s=600.0, num_cpus=0.1))
        try:
            start = time.perf_counter()
            client = service.client(f"bench:{index}", opener)
            replicas_start_s = time.perf_counter() - start
            service_s, served = timed(lambda: client.search_requests(requests), args.repeats)
        finally:
            service.stop()
            ray.shutdown()
    same = all(a.ids == b.ids and a.scores == b.scores and a.total == b.total and a.warnings == b.warnings
               for a, b in zip(expected, served))
    report = {
        "queries": len(queries), "k": args.k, "replicas": args.replicas, "cpus": os.cpu_count(),
        "load_1min": os.getloadavg()[0], "in_process_1_thread_s": one_thread,
        f"in_process_{threads}_threads_s": pool_s, "service_s": service_s,
        "service_over_1_thread": service_s / one_thread, f"service_over_{threads}_threads": service_s / pool_s,
        "ray_start_s": ray_start_s, "replicas_start_s": replicas_start_s, "answers_equal": same,
        "service_counters": client.stats(),
    }
    for key, value in report.items():
        print(f"{key:28s} {value:.3f}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if not same:
        sys.exit("the service's answers differ from the in-process engine's")


if __name__ == "__main__":
    main()
