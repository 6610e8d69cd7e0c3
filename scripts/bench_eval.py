#!/usr/bin/env python
"""Evaluation throughput: resume and search-cache reuse, and LLM request concurrency.

    python scripts/bench_eval.py [--topics 48] [--llm-requests 32] [--latency 0.05]

1. trials_sigir baselines (original, clinicians, gpt4_conditions) on every topic, three ways in the
   same run: a cold run (empty output folder and search cache), the same command again (every
   record reused: resume), and a new output folder sharing the search cache (generation redone,
   searches from the cache). The local index is built (or found) before timing.
2. LLM client against the loopback OpenAI-compatible server answering after `--latency` seconds:
   `--llm-requests` prompts with concurrency 1 and 8, then again from the answer cache.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topics", type=int, default=48)
    parser.add_argument("--llm-requests", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()

    from deepretrieval.search.local_index import ensure_local_index
    from deepretrieval.eval.fake_openai import FakeOpenAIServer
    from deepretrieval.eval.llm_client import ChatClient
    from deepretrieval.eval.runner import BaselineMethod, Searcher, evaluate, load_samples

    ensure_local_index("trials_sigir")
    samples = load_samples("trials_sigir", split="all", limit=args.topics)
    names = ["original", "clinicians", "gpt4_conditions"]
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    cache = tmp / "search_cache.sqlite"

    def run(out: Path) -> int:
        searcher = Searcher(cache=cache)
        return sum(len(evaluate(samples, BaselineMethod(n), out, searcher=searcher, progress=False)) for n in names)

    cold, n_rec = timed(lambda: run(tmp / "a"))
    resumed, _ = timed(lambda: run(tmp / "a"))
    warm, _ = timed(lambda: run(tmp / "b"))
    print(f"baselines on {len(samples)} topics x {len(names)} methods ({n_rec} query records)")
    print(f"  cold run             {cold:6.2f} s")
    print(f"  same command (resume) {resumed:6.2f} s   cold/resume = {cold / resumed:5.1f}x")
    print(f"  new folder, cached searches {warm:6.2f} s   cold/warm = {cold / warm:5.1f}x")

    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(args.llm_requests)]
    with FakeOpenAIServer(delay_s=args.latency) as srv:
        seq, _ = timed(lambda: ChatClient(base_url=srv.base_url, model="m", concurrency=1).complete_many(convs))
        c8 = ChatClient(base_url=srv.base_url, model="m", concurrency=8, cache_path=tmp / "llm.sqlite")
        par, _ = timed(lambda: c8.complete_many(convs))
        cached, res = timed(lambda: c8.complete_many(convs))
        assert all(r.cached for r in res)
    print(f"LLM client, {args.llm_requests} requests, server latency {args.latency * 1000:.0f} ms")
    print(f"  concurrency 1  {seq:6.2f} s")
    print(f"  concurrency 8  {par:6.2f} s   ratio {seq / par:5.1f}x")
    print(f"  answer cache   {cached:6.3f} s   ratio {par / cached:5.1f}x vs concurrency 8")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
