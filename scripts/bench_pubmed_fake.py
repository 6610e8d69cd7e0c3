"""Throughput of the PubMed client under a rate limit, against a loopback fake esearch.

Default setting (issue 3): 64 queries x 3 pages against a server with 150 ms latency that
answers HTTP 429 above 10 requests/s. The rate-limit bound is `requests / rate`; the
concurrent client (threads share one limiter) should finish within 20% of it, while a
sequential client is latency-bound (`requests * latency`). A rerun of the same queries
is then answered from the SQLite cache.

    python scripts/bench_pubmed_fake.py                 # prints a table and a JSON line
    python scripts/bench_reward.py --engine pubmed-fake # the same, via the reward benchmark

Importable: `from bench_pubmed_fake import add_arguments, run_pubmed_fake`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict


from deepretrieval.search.fakes import FakeAnswer, FakePubMedServer, synthetic_ids
from deepretrieval.search.pubmed import PubMedSearchEngine

OPTIONS = [
    ("--queries", dict(type=int, default=64, help="distinct queries (default 64)")),
    ("--pages", dict(type=int, default=3, help="esearch pages per query (default 3)")),
    ("--page-size", dict(type=int, default=100, help="ids per page (default 100)")),
    ("--latency", dict(type=float, default=0.15, help="server latency per request, s (default 0.15)")),
    ("--rate", dict(type=float, default=10.0, help="server limit, requests/s (default 10)")),
    ("--threads", dict(type=int, default=16, help="client threads (default 16)")),
    ("--skip-sequential", dict(action="store_true", help="skip the sequential baseline")),
    ("--unlimited-baseline", dict(action="store_true",
                                  help="also run the concurrent client with its rate limiter off")),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this benchmark's options (options another benchmark already defines are kept)."""
    for flag, kwargs in OPTIONS:
        if flag not in parser._option_string_actions:  # noqa: SLF001 - shared parsers
            parser.add_argument(flag, **kwargs)


def _opt(args: Any, name: str) -> Any:
    default = dict((flag.lstrip("-").replace("-", "_"), kw.get("default")) for flag, kw in OPTIONS)
    return getattr(args, name, default[name])


def _timed_batch(engine: PubMedSearchEngine, queries, k: int, threads: int) -> Dict[str, Any]:
    start = time.perf_counter()
    results = engine.batch_search(queries, k=k, threads=threads)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "ok": sum(r.ok for r in results),
        "errors": sum(not r.ok for r in results),
        "ids": sum(len(r.ids) for r in results),
        "cached": sum(r.cached for r in results),
    }


def run_pubmed_fake(args: Any) -> Dict[str, Any]:
    """Run the benchmark; returns the figures (also printed by `main`)."""
    n_queries, pages, page_size = _opt(args, "queries"), _opt(args, "pages"), _opt(args, "page_size")
    latency, rate, threads = _opt(args, "latency"), _opt(args, "rate"), _opt(args, "threads")
    k = pages * page_size
    queries = [f"benchmark topic {i} AND randomized controlled trial[pt]" for i in range(n_queries)]
    answers = {q: FakeAnswer(ids=synthetic_ids(q, n=k + page_size // 2)) for q in queries}
    requests_needed = n_queries * pages
    bound = requests_needed / rate
    out: Dict[str, Any] = {
        "benchmark": "pubmed-fake", "queries": n_queries, "pages": pages, "page_size": page_size,
        "latency_s": latency, "server_rate": rate, "threads": threads, "requests": requests_needed,
        "rate_bound_s": bound,
    }
    with tempfile.TemporaryDirectory() as tmp, FakePubMedServer(answers=answers, latency=latency, rate_limit=rate) as srv:
        common = dict(base_url=srv.url, api_key="bench-key", rate_limit=rate, page_size=page_size,
                      ratelimit_dir=Path(tmp) / "rl", timeout=10.0)
        engine = PubMedSearchEngine(cache=Path(tmp) / "cache.sqlite", **common)
        concurrent = _timed_batch(engine, queries, k, threads)
        out["concurrent"] = {**concurrent, "server_requests": len(srv.requests), "server_429": srv.rate_limited,
                             "ratio_to_bound": concurrent["wall_s"] / bound}
        srv.reset_log()
        rerun = _timed_batch(engine, queries, k, threads)
        out["cache_rerun"] = {**rerun, "server_requests": len(srv.requests)}
        engine.close()
        if not _opt(args, "skip_sequential"):
            srv.reset_log()
            seq_engine = PubMedSearchEngine(cache=False, **common)
            sequential = _timed_batch(seq_engine, queries, k, 1)
            out["sequential"] = {**sequential, "server_requests": len(srv.requests), "server_429": srv.rate_limited,
                                 "ratio_to_bound": sequential["wall_s"] / bound}
            out["speedup_vs_sequential"] = sequential["wall_s"] / concurrent["wall_s"]
            seq_engine.close()
        if _opt(args, "unlimited_baseline"):
            srv.reset_log()
            time.sleep(1.0)  # let the server's window drain
            free = PubMedSearchEngine(cache=False, **{**common, "rate_limit": 0})
            unlimited = _timed_batch(free, queries, k, threads)
            out["unlimited"] = {**unlimited, "server_requests": len(srv.requests), "server_429": srv.rate_limited,
                                "ratio_to_bound": unlimited["wall_s"] / bound}
            free.close()
    out["within_20pct_of_bound"] = out["concurrent"]["ratio_to_bound"] <= 1.2
    return out


def report(out: Dict[str, Any]) -> str:
    lines = [
        f"pubmed-fake: {out['queries']} queries x {out['pages']} pages = {out['requests']} requests, "
        f"server {out['latency_s'] * 1000:.0f} ms latency, {out['server_rate']:g} req/s limit; "
        f"rate-limit bound {out['rate_bound_s']:.2f} s",
    ]
    c = out["concurrent"]
    lines.append(f"  concurrent ({out['threads']} threads): {c['wall_s']:.2f} s = {c['ratio_to_bound']:.3f} x bound, "
                 f"{c['server_requests']} requests, {c['server_429']} x 429, {c['errors']} errors")
    if "sequential" in out:
        s = out["sequential"]
        lines.append(f"  sequential:               {s['wall_s']:.2f} s = {s['ratio_to_bound']:.3f} x bound "
                     f"(concurrent is {out['speedup_vs_sequential']:.2f}x faster)")
    if "unlimited" in out:
        u = out["unlimited"]
        lines.append(f"  no client limiter:        {u['wall_s']:.2f} s = {u['ratio_to_bound']:.3f} x bound, "
                     f"{u['server_requests']} requests, {u['server_429']} x 429, {u['errors']} errors")
    r = out["cache_rerun"]
    lines.append(f"  cache rerun:              {r['wall_s'] * 1000:.1f} ms, {r['cached']}/{out['queries']} cached, "
                 f"{r['server_requests']} requests")
    lines.append(f"  within 20% of bound: {out['within_20pct_of_bound']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    out = run_pubmed_fake(args)
    print(report(out))
    print(json.dumps(out))
    return 0 if out["concurrent"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
