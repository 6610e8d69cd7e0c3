"""Benchmark the reward manager against a sequential, non-deduplicated compute_score loop.

    python scripts/bench_reward.py --engine local          # 512 answers on pubmed_mini, recall@100
    python scripts/bench_reward.py --engine pubmed-fake    # live PubMed client on a loopback fake
                                                           # (scripts/bench_pubmed_fake.py)

`--engine local`: answers are built the way GRPO rollouts look: for each pubmed_mini topic,
queries written from the words of its review question (ANDed/ORed groups, phrases, [tiab]
tags, truncation), each answer either a fresh query or a repeat of one already sampled for the
topic (`--repeat-prob`), plus a share of malformed answers (`--error-prob`). Both paths use the
same engine instance, warmed first; each is timed `--repeats` times and the median reported,
with the ratio measured in the same run. The goal is <= 2 s for 512 answers on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

STOP = {
    "a", "an", "and", "are", "as", "at", "by", "for", "from", "in", "is", "of", "on", "or", "the", "to",
    "with", "without", "versus", "vs", "among", "other", "their", "its", "than", "that", "what", "which",
    "who", "patients", "people", "effects", "effect", "comparative", "effectiveness", "safety", "drug",
    "drugs", "treatment", "treatments", "use", "used", "using", "accuracy", "diagnostic", "test", "tests",
}


def topic_words(title: str) -> List[str]:
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z0-9-]{2,}", title)]
    seen, out = set(), []
    for w in words:
        if w not in STOP and w not in seen:
            seen.add(w)
            out.append(w)
    return out or ["study"]


def random_query(words: List[str], rng: random.Random) -> str:
    """A Boolean query of the kind a policy writes: groups of synonyms-or-words joined by AND."""
    picked = rng.sample(words, min(len(words), rng.randint(2, 5)))
    groups: List[str] = []
    i = 0
    while i < len(picked):
        size = rng.choice((1, 1, 2))
        chunk = picked[i : i + size]
        i += size
        terms = []
        for w in chunk:
            style = rng.random()
            if style < 0.2:
                terms.append(f"{w}[tiab]")
            elif style < 0.3 and len(w) > 5:
                terms.append(w[: max(4, len(w) - 3)] + "*")
            else:
                terms.append(w)
        groups.append(terms[0] if len(terms) == 1 else "(" + " OR ".join(terms) + ")")
    op = rng.choice((" AND ", " AND ", " OR "))
    return op.join(groups)


def make_answers(rows: List[dict], n: int, repeat_prob: float, error_prob: float, seed: int) -> List[Tuple[str, dict, dict]]:
    """(response, ground_truth, extra_info) triples, GRPO-like: topic-major with repeats."""
    rng = random.Random(seed)
    previous: Dict[str, List[str]] = {}
    out = []
    for i in range(n):
        row = rows[i % len(rows)]
        topic = row["extra_info"]["topic_id"]
        content = row["prompt"][0]["content"]
        question = content.rsplit("The review question is:\n", 1)[-1]
        pool = previous.setdefault(topic, [])
        r = rng.random()
        if r < error_prob / 2:
            response = "I think the answer is a query about " + question
        elif r < error_prob:
            response = "reasoning\n</think>\n<answer>" + question + "</answer>"
        else:
            if pool and rng.random() < repeat_prob:
                query = rng.choice(pool)
            else:
                query = random_query(topic_words(question), rng)
                pool.append(query)
            response = "The review asks about: " + question + "\n</think>\n<answer>" + json.dumps({"query": query}) + "</answer>"
        out.append((response, row["reward_model"]["ground_truth"], row["extra_info"]))
    return out


def bench_local(args: argparse.Namespace) -> int:
    from deepretrieval.data import tasks
    from deepretrieval.search.local_index import ensure_local_index
    from deepretrieval.rewards import literature
    from deepretrieval.rewards.manager import RewardManager
    from deepretrieval.search.local import LocalSearchEngine

    index_dir = Path(args.index_dir) if args.index_dir else ensure_local_index("pubmed_mini")
    splits = tasks.build_splits("pubmed_mini")
    rows = splits["train"] + splits["test"]
    answers = make_answers(rows, args.n, args.repeat_prob, args.error_prob, args.seed)
    texts = [a[0] for a in answers]
    gts = [a[1] for a in answers]
    infos = [a[2] for a in answers]
    sources = ["pubmed_mini"] * len(answers)
    config = {"num_workers": args.threads, "pubmed_mini": {"engine": "local", "k": args.k, "index_dir": str(index_dir)}}
    reward_config = literature.RewardConfig.from_config(config)
    engine = LocalSearchEngine(index_dir)
    literature.set_engine("pubmed_mini", engine)
    manager = RewardManager(None, config=config)

    # warm: open files, fill the OS page cache and the truncation cache for both paths alike
    manager.score_texts(texts, sources, gts, infos)

    def run_manager():
        return manager.score_texts(texts, sources, gts, infos)

    def run_sequential():
        return [literature.compute_score("pubmed_mini", t, g, e, config=reward_config, engine=engine)
                for t, g, e in zip(texts, gts, infos)]

    timings: Dict[str, List[float]] = {"manager": [], "sequential": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("manager", run_manager), ("sequential", run_sequential)):
            start = time.perf_counter()
            results[name] = fn()
            timings[name].append(time.perf_counter() - start)
    keys = ("score", "recall", "error")
    same = all({k: a[k] for k in keys} == {k: b[k] for k in keys} for a, b in zip(results["manager"], results["sequential"]))
    metrics = manager.metrics(results["manager"], sources)
    t_manager = statistics.median(timings["manager"])
    t_seq = statistics.median(timings["sequential"])
    report = {
        "engine": "local (pubmed_mini, %d docs)" % engine.num_docs,
        "answers": len(texts),
        "k": args.k,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "unique_searches": int(manager.last_search_stats["searches"]),
        "manager_s_median": round(t_manager, 3),
        "sequential_s_median": round(t_seq, 3),
        "speedup": round(t_seq / t_manager, 2),
        "answers_per_s": round(len(texts) / t_manager, 1),
        "within_2s_goal": t_manager <= 2.0,
        "identical_results": same,
        "reward_mean": round(metrics["reward/mean"], 3),
        "recall_mean": round(metrics["reward/recall_mean"], 3),
        "unique_query_ratio": round(metrics["reward/unique_query_ratio"], 3),
        "format_error_ratio": round(metrics["reward/format_error_ratio"], 3),
        "json_error_ratio": round(metrics["reward/json_error_ratio"], 3),
        "query_syntax_error_ratio": round(metrics["reward/query_syntax_error_ratio"], 3),
        "search_time_mean_ms": round(1000 * manager.last_search_stats["search_time_mean_s"], 2),
    }
    print(json.dumps(report, indent=2))
    literature.set_engine("pubmed_mini", None)
    return 0 if same else 1


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--engine", choices=["local", "pubmed-fake"], default="local")
    known, rest = pre.parse_known_args(argv)
    if known.engine == "pubmed-fake":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        try:
            import bench_pubmed_fake  # written with the live engines; not reimplemented here
        except ImportError as exc:
            print(f"--engine pubmed-fake needs scripts/bench_pubmed_fake.py ({exc})", file=sys.stderr)
            return 2

        parser = argparse.ArgumentParser(description="PubMed client benchmark on the loopback fake")
        bench_pubmed_fake.add_arguments(parser)
        out = bench_pubmed_fake.run_pubmed_fake(parser.parse_args(rest))
        if hasattr(bench_pubmed_fake, "report"):
            print(bench_pubmed_fake.report(out))
        print(json.dumps(out))
        return 0 if out.get("concurrent", {}).get("errors", 0) == 0 else 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["local", "pubmed-fake"], default="local")
    parser.add_argument("--n", type=int, default=512, help="answers to score")
    parser.add_argument("--k", type=int, default=100, help="recall@k")
    parser.add_argument("--threads", type=int, default=2, help="search threads of the manager")
    parser.add_argument("--repeat-prob", type=float, default=0.5, help="chance an answer repeats an earlier query of its topic")
    parser.add_argument("--error-prob", type=float, default=0.06, help="share of malformed answers")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index-dir", default=None, help="pubmed_mini index (default: built on first use)")
    return bench_local(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
