#!/usr/bin/env python
"""Benchmark the local search engine (deepretrieval.search.local).

Part 1, pubmed_mini (41k PubMed records, 28 topics):
  index build time and size; query latency (median, p95) for bag-of-words queries (topic titles
  OR-ed) and for Boolean / field / truncation queries; recall@100/@1000 of the topic titles and
  of the CLEF topics' expert `boolean_query`; the same measurements for bm25s (bag-of-words)
  in the same run, reported as ratios.
Part 2, scale: synthetic PubMed-like corpora (titles, abstracts and MeSH lists drawn from
  pubmed_mini's length distributions and word frequencies, random publication dates) at
  10k / 100k (and 1M with --full) records: index throughput (docs/s), bytes per document and
  query latency, to size a full PubMed mirror (~37M records).
Part 3, at each scale point, in the same run (ratios): searches that count every match
  (`count=True`, the CLI's --total) against top-k only (the reward's searches); a --shards N index
  against the single one (build time, latency, top-100 overlap, identical Boolean match counts);
  and whether tantivy releases the GIL while it searches (a pure-Python thread's progress during
  searches, relative to its progress alone).

Usage:  python scripts/bench_search.py [--scales 10000,100000] [--full] [--skip-bm25s] [--shards 4]
                                       [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Sequence


from deepretrieval.search.local import LocalSearchEngine
from deepretrieval.search.local_index import build_index, index_size_bytes, make_analyzer

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT / "data" / "pubmed_mini"

# Boolean / field / truncation queries of the kind the policy writes (PubMed syntax).
BOOLEAN_QUERIES = [
    '(aspirin[tiab] OR "acetylsalicylic acid"[tiab]) AND (stroke[tiab] OR "cerebrovascular accident"[tiab])',
    "(ACE inhibitor*[tiab] OR captopril[tiab] OR enalapril[tiab]) AND hypertension[mh] AND NOT animals[mh]",
    '"Double-Blind Method"[mh] AND (opioid*[tiab] OR morphine[tiab]) AND pain[tiab]',
    "(proton pump inhibitor*[tiab] OR omeprazole[tiab] OR lansoprazole[tiab]) AND (ulcer*[tiab] OR reflux[tiab])",
    "(antipsychotic*[tiab] OR olanzapine[tiab] OR risperidone[tiab]) AND schizophreni*[tiab] AND randomi*[tiab]",
    "(galactomannan[tiab] OR aspergill*[tiab]) AND (sensitivity[tiab] OR specificity[tiab])",
    '(statin*[tiab] OR "hydroxymethylglutaryl-coa reductase inhibitors"[mh]) AND cholesterol[tiab]',
    "(estrogen*[tiab] OR hormone replacement[tiab]) AND (menopaus*[tiab] OR postmenopaus*[tiab])",
    "(triptan*[tiab] OR sumatriptan[tiab]) AND migraine[tiab] NOT child*[tiab]",
    '(magnetic resonance imag*[tiab] OR MRI[tiab]) AND (dementia[tiab] OR alzheimer*[tiab])',
    "(beta blocker*[tiab] OR atenolol[tiab] OR metoprolol[tiab]) AND (heart failure[tiab] OR hypertension[tiab])",
    "(calcium channel blocker*[tiab] OR nifedipine[tiab] OR amlodipine[tiab]) AND blood pressure[tiab]",
]


def pct(values: Sequence[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    idx = min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))
    return values[idx]


def latency(engine: LocalSearchEngine, queries: Sequence[str], k: int = 100, repeat: int = 3,
            count: bool = False) -> Dict[str, float]:
    for q in queries:  # warm-up (expansion cache, OS page cache)
        engine.search(q, k=k, count=count)
    times = []
    for _ in range(repeat):
        for q in queries:
            t0 = time.perf_counter()
            engine.search(q, k=k, count=count)
            times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": statistics.median(times), "p95_ms": pct(times, 0.95), "n": len(times)}


def bow_query(text: str, analyzer) -> str:
    """A bag-of-words query in PubMed syntax: the distinct title words OR-ed."""
    toks = list(dict.fromkeys(analyzer.analyze(text)))
    return " OR ".join(f'"{t}"' for t in toks)


def recall(ids: Sequence[str], relevant: Sequence[str], k: int) -> float:
    rel = set(relevant)
    return len(rel & set(ids[:k])) / len(rel) if rel else float("nan")


def strip_annotation(q: str) -> str:
    """CD009020's query ends with a pasted 'Total references = 1551' note, which is not part of
    the search; without it the line is what the review ran."""
    import re

    return re.sub(r"Total references\s*=\s*\d+\s*$", "", q.strip())


def bench_pubmed_mini(args) -> Dict:
    out: Dict = {}
    topics = [json.loads(l) for l in (DATA / "topics.jsonl").open()]
    analyzer = make_analyzer()
    tmp = Path(tempfile.mkdtemp(prefix="bench_search_"))
    try:
        t0 = time.perf_counter()
        meta = build_index(DATA / "corpus.jsonl.gz", tmp / "idx", progress=False, num_threads=args.threads)
        out["index_s"] = time.perf_counter() - t0
        out["num_docs"] = meta["num_docs"]
        out["index_bytes"] = index_size_bytes(tmp / "idx")
        t0 = time.perf_counter()
        engine = LocalSearchEngine(tmp / "idx")
        out["open_ms"] = (time.perf_counter() - t0) * 1000

        bow = [bow_query(t["title"], analyzer) for t in topics]
        out["latency_bow"] = latency(engine, bow)
        out["latency_boolean"] = latency(engine, BOOLEAN_QUERIES)
        for name, queries in (("bow", bow), ("boolean", BOOLEAN_QUERIES)):
            out[f"count_vs_topk_{name}"] = paired_latency({"topk": (engine, False), "counted": (engine, True)}, queries)
        clef = [t for t in topics if t["boolean_query"]]
        out["latency_clef_expert"] = latency(engine, [strip_annotation(t["boolean_query"]) for t in clef], k=1000,
                                             repeat=1)

        rec = {"title_bow": {100: [], 1000: []}, "expert_boolean": {100: [], 1000: []}}
        per_topic = []
        for t in topics:
            res = engine.search(bow_query(t["title"], analyzer), k=1000)
            r100, r1000 = recall(res.ids, t["relevant"], 100), recall(res.ids, t["relevant"], 1000)
            rec["title_bow"][100].append(r100)
            rec["title_bow"][1000].append(r1000)
            row = {"topic": t["topic_id"], "bow_r100": r100, "bow_r1000": r1000}
            if t["boolean_query"]:
                res = engine.search(strip_annotation(t["boolean_query"]), k=1000, count=True)
                row.update(bool_total=res.total, bool_r100=recall(res.ids, t["relevant"], 100),
                           bool_r1000=recall(res.ids, t["relevant"], 1000))
                rec["expert_boolean"][100].append(row["bool_r100"])
                rec["expert_boolean"][1000].append(row["bool_r1000"])
            per_topic.append(row)
        out["recall"] = {name: {k: statistics.mean(v) for k, v in d.items()} for name, d in rec.items()}
        out["per_topic"] = per_topic

        if not args.skip_bm25s:
            out["bm25s"] = bench_bm25s(topics)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def bench_bm25s(topics) -> Dict:
    import bm25s

    docs, ids = [], []
    with gzip.open(DATA / "corpus.jsonl.gz", "rt") as fh:
        for line in fh:
            r = json.loads(line)
            ids.append(r["pmid"])
            docs.append(f"{r['title']} {r['abstract']} {' '.join(r['mesh'])}")
    t0 = time.perf_counter()
    tokens = bm25s.tokenize(docs, stopwords="en", show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    index_s = time.perf_counter() - t0
    queries = [t["title"] for t in topics]
    qtok = bm25s.tokenize(queries, stopwords="en", show_progress=False)
    retriever.retrieve(qtok, k=100, show_progress=False)  # warm-up
    times, r100, r1000 = [], [], []
    for t in topics:
        t0 = time.perf_counter()
        q = bm25s.tokenize([t["title"]], stopwords="en", show_progress=False)
        res, _ = retriever.retrieve(q, k=1000, show_progress=False)
        times.append((time.perf_counter() - t0) * 1000)
        got = [ids[i] for i in res[0]]
        r100.append(recall(got, t["relevant"], 100))
        r1000.append(recall(got, t["relevant"], 1000))
    return {"index_s": index_s, "latency_bow": {"median_ms": statistics.median(times), "p95_ms": pct(times, 0.95)},
            "recall": {100: statistics.mean(r100), 1000: statistics.mean(r1000)}}


# ----------------------------------------------------------------------------- synthetic scale

def write_synthetic(path: Path, n: int, profile, seed: int = 0) -> None:
    """`n` records drawn from pubmed_mini's distributions (search.synthetic, the generator of
    scripts/bench_search_scale.py) as gzipped JSON Lines."""
    from itertools import chain

    from deepretrieval.search.synthetic import generate, write_jsonl

    write_jsonl(path, chain.from_iterable(generate(n, profile, seed=seed)))


def bench_scale(args, scales: List[int]) -> List[Dict]:
    from deepretrieval.search.synthetic import CorpusProfile

    profile = CorpusProfile.from_corpus(DATA / "corpus.jsonl.gz")
    topics = [json.loads(l) for l in (DATA / "topics.jsonl").open()]
    analyzer = make_analyzer()
    bow = [bow_query(t["title"], analyzer) for t in topics]
    rows = []
    for n in scales:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench_scale_{n}_"))
        try:
            corpus = tmp / "corpus.jsonl.gz"
            t0 = time.perf_counter()
            write_synthetic(corpus, n, profile)
            gen_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            build_index(corpus, tmp / "idx", progress=False, num_threads=args.threads)
            index_s = time.perf_counter() - t0
            size = index_size_bytes(tmp / "idx")
            engine = LocalSearchEngine(tmp / "idx")
            row = {
                "records": n, "generate_s": gen_s, "index_s": index_s, "docs_per_s": n / index_s,
                "index_bytes": size, "bytes_per_doc": size / n,
                "bow": latency(engine, bow, repeat=1 if n >= 1_000_000 else 2),
                "boolean": latency(engine, BOOLEAN_QUERIES, repeat=1 if n >= 1_000_000 else 3),
            }
            if args.shards > 1:
                row.update(compare_shards(args, engine, corpus, tmp, bow, index_s))
            corpus.unlink()
            rows.append(row)
            print(f"  scale {n}: {json.dumps(row)}", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def paired_latency(configs: Dict[str, tuple], queries: Sequence[str], k: int = 100,
                   repeat: int = 3) -> Dict[str, Dict[str, float]]:
    """Latency of each (engine, count) configuration, the configurations taking turns on every
    query, so a change in the machine's load affects them alike and their ratios stay fair."""
    times: Dict[str, List[float]] = {name: [] for name in configs}
    for rep in range(repeat + 1):  # the first round warms up
        for q in queries:
            for name, (engine, count) in configs.items():
                t0 = time.perf_counter()
                engine.search(q, k=k, count=count)
                if rep:
                    times[name].append((time.perf_counter() - t0) * 1000)
    return {name: {"median_ms": statistics.median(t), "p95_ms": pct(t, 0.95), "n": len(t)} for name, t in times.items()}


def gil_probe(search, seconds: float = 1.0) -> Dict[str, float]:
    """How far a pure-Python counting thread gets while `search()` runs in a loop, relative to
    alone: near 0 if searching holds the GIL, near 1 (or the share of a free core) if it is released."""
    stop, counter = threading.Event(), [0]

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    time.sleep(0.2)
    c0, t0 = counter[0], time.perf_counter()
    time.sleep(seconds)
    alone = (counter[0] - c0) / (time.perf_counter() - t0)
    c0, t0, n = counter[0], time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        search()
        n += 1
    during = (counter[0] - c0) / (time.perf_counter() - t0)
    stop.set()
    thread.join(timeout=5)
    return {"spin_share_during_search": during / alone if alone else float("nan"), "searches": n}


def compare_shards(args, engine: LocalSearchEngine, corpus: Path, tmp: Path, bow: Sequence[str],
                   index_s: float) -> Dict:
    """Count vs top-k only, and the single index vs a sharded one, on the same corpus."""
    out: Dict = {}
    t0 = time.perf_counter()
    build_index(corpus, tmp / "sharded", progress=False, num_threads=args.threads, shards=args.shards)
    out["sharded_index_s"] = time.perf_counter() - t0
    out["sharded_build_ratio"] = out["sharded_index_s"] / index_s
    sharded = LocalSearchEngine(tmp / "sharded")
    configs = {"single": (engine, False), "counted": (engine, True), "sharded": (sharded, False),
               "sharded_counted": (sharded, True)}
    for name, queries in (("bow", bow), ("boolean", BOOLEAN_QUERIES)):
        for config, figures in paired_latency(configs, queries, repeat=3).items():
            out[f"{name}_{config}"] = figures
    out["boolean_totals_equal"] = all(engine.count(q) == sharded.count(q) for q in BOOLEAN_QUERIES)
    out["bow_top100_overlap"] = statistics.mean(
        len(set(engine.search(q, k=100).ids) & set(sharded.search(q, k=100).ids)) / 100 for q in bow)
    heavy = max(bow, key=len)
    out["gil_single"] = gil_probe(lambda: engine.search(heavy, k=100, count=True))
    out["gil_sharded"] = gil_probe(lambda: sharded.search(heavy, k=100, count=True))
    sharded.close()
    return out


def _ratio(a: Dict[str, float], b: Dict[str, float]) -> str:
    return f"{a['median_ms'] / b['median_ms']:.2f}" if b["median_ms"] else "-"


def to_markdown(mini: Dict, scale: List[Dict]) -> str:
    lines = []
    if mini:
        lines += [
            "### pubmed_mini (41,060 records)", "",
            "| measure | local (tantivy) | bm25s | ratio local/bm25s |", "|---|---|---|---|",
        ]
        b = mini.get("bm25s")
        lines.append(f"| index build (s) | {mini['index_s']:.2f} | {b['index_s']:.2f} | {mini['index_s'] / b['index_s']:.2f} |"
                     if b else f"| index build (s) | {mini['index_s']:.2f} | - | - |")
        lines.append(f"| index size (MB) | {mini['index_bytes'] / 1e6:.1f} | - | - |")
        lb = mini["latency_bow"]
        if b:
            lines.append(f"| bag-of-words latency median / p95 (ms) | {lb['median_ms']:.2f} / {lb['p95_ms']:.2f} | "
                         f"{b['latency_bow']['median_ms']:.2f} / {b['latency_bow']['p95_ms']:.2f} | "
                         f"{lb['median_ms'] / b['latency_bow']['median_ms']:.2f} |")
        else:
            lines.append(f"| bag-of-words latency median / p95 (ms) | {lb['median_ms']:.2f} / {lb['p95_ms']:.2f} | - | - |")
        lbo, lcl = mini["latency_boolean"], mini["latency_clef_expert"]
        lines.append(f"| Boolean/field/truncation latency median / p95 (ms) | {lbo['median_ms']:.2f} / {lbo['p95_ms']:.2f} | - | - |")
        lines.append(f"| CLEF expert multi-line searches median / p95 (ms, k=1000) | {lcl['median_ms']:.1f} / {lcl['p95_ms']:.1f} | - | - |")
        r = mini["recall"]
        if b:
            lines.append(f"| recall@100 / @1000, topic titles (28) | {r['title_bow'][100]:.3f} / {r['title_bow'][1000]:.3f} | "
                         f"{b['recall'][100]:.3f} / {b['recall'][1000]:.3f} | "
                         f"{r['title_bow'][1000] / b['recall'][1000]:.2f} (@1000) |")
        lines.append(f"| recall@100 / @1000, CLEF expert boolean_query (17) | {r['expert_boolean'][100]:.3f} / "
                     f"{r['expert_boolean'][1000]:.3f} | - | - |")
        for name in ("bow", "boolean"):
            pair = mini[f"count_vs_topk_{name}"]
            lines.append(f"| {name}: counted / top-k only, median ms (ratio) | {pair['counted']['median_ms']:.2f} / "
                         f"{pair['topk']['median_ms']:.2f} ({_ratio(pair['counted'], pair['topk'])}) | - | - |")
        lines += ["", "| topic | title BoW R@100 | R@1000 | expert Boolean matches | R@100 | R@1000 |", "|---|---|---|---|---|---|"]
        for row in mini["per_topic"]:
            if "bool_total" in row:
                lines.append(f"| {row['topic']} | {row['bow_r100']:.2f} | {row['bow_r1000']:.2f} | {row['bool_total']} | "
                             f"{row['bool_r100']:.2f} | {row['bool_r1000']:.2f} |")
    if scale:
        lines += ["", "### Synthetic PubMed-like corpora", "",
                  "| records | index (s) | docs/s | index size (MB) | bytes/doc | BoW median / p95 (ms) | Boolean median / p95 (ms) |",
                  "|---|---|---|---|---|---|---|"]
        for r in scale:
            lines.append(f"| {r['records']:,} | {r['index_s']:.1f} | {r['docs_per_s']:,.0f} | {r['index_bytes'] / 1e6:.1f} | "
                         f"{r['bytes_per_doc']:.0f} | {r['bow']['median_ms']:.2f} / {r['bow']['p95_ms']:.2f} | "
                         f"{r['boolean']['median_ms']:.2f} / {r['boolean']['p95_ms']:.2f} |")
    sharded = [r for r in scale if "sharded_index_s" in r]
    if sharded:
        lines += ["", "### Count vs top-k only; single vs sharded index (median ms, same run)", "",
                  "| records | queries | top-k | counted | counted/top-k | sharded top-k | sharded/single (top-k) "
                  "| sharded counted | sharded/single (counted) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sharded:
            for name in ("bow", "boolean"):
                one, cnt, sh, shc = (r[f"{name}_{c}"] for c in ("single", "counted", "sharded", "sharded_counted"))
                lines.append(f"| {r['records']:,} | {name} | {one['median_ms']:.2f} | {cnt['median_ms']:.2f} | "
                             f"{_ratio(cnt, one)} | {sh['median_ms']:.2f} | {_ratio(sh, one)} | {shc['median_ms']:.2f} | "
                             f"{_ratio(shc, cnt)} |")
        lines += ["", "| records | sharded build (s) | sharded/single build | Boolean totals equal | BoW top-100 overlap "
                  "| Python thread's progress during search: single / sharded |", "|---|---|---|---|---|---|"]
        for r in sharded:
            lines.append(f"| {r['records']:,} | {r['sharded_index_s']:.1f} | {r['sharded_build_ratio']:.2f} | "
                         f"{r['boolean_totals_equal']} | {r['bow_top100_overlap']:.3f} | "
                         f"{r['gil_single']['spin_share_during_search']:.2f} / "
                         f"{r['gil_sharded']['spin_share_during_search']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="10000,100000", help="comma-separated synthetic corpus sizes ('' to skip)")
    ap.add_argument("--full", action="store_true", help="also run the 1,000,000-record scale point")
    ap.add_argument("--skip-mini", action="store_true")
    ap.add_argument("--skip-bm25s", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="indexing threads (0: tantivy's choice)")
    ap.add_argument("--shards", type=int, default=4, help="also build and search an N-shard index at each scale "
                    "point (1: skip)")
    ap.add_argument("--json", help="write all figures to this JSON file")
    args = ap.parse_args(argv)
    print(f"cpus available: {len(os.sched_getaffinity(0))}", flush=True)
    mini = {} if args.skip_mini else bench_pubmed_mini(args)
    if mini:
        print(json.dumps({k: v for k, v in mini.items() if k != "per_topic"}, indent=1), flush=True)
    scales = [int(s) for s in args.scales.split(",") if s.strip()]
    if args.full and 1_000_000 not in scales:
        scales.append(1_000_000)
    scale = bench_scale(args, scales) if scales else []
    md = to_markdown(mini, scale)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"pubmed_mini": mini, "scale": scale}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
