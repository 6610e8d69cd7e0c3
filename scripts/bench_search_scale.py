#!/usr/bin/env python
"""PubMed at scale: the local engine on >= 5M synthetic PubMed-like records.

Measures, in one run (figures in docs/benchmarks.md, "PubMed at scale"):
1. the synthetic generator (`deepretrieval.search.synthetic`, drawn from pubmed_mini's word,
   length and MeSH distributions): records/s;
2. the PubMed XML reader (`ingest.read_pubmed_xml`) and the full mirror ingest
   (`mirror.ingest_pubmed`: parse + presence check + index + commit) on `--xml-records` synthetic
   records in `--xml-files` baseline files, once per `--parse-workers` value (0: parsed in the
   applying process; N: N processes parse the next files meanwhile): records/s and the speed-up;
3. index build of `--records` records streamed from the generator through the mirror writer
   (`mirror.MirrorWriter`, commits every `--commit-every`; a sharded index: one process per
   shard; with the combined field unless `--no-all-field`): wall docs/s (generation included), CPU microseconds per record for generating and
   for indexing (all threads), bytes/record;
4. query latency p50/p95 (k = 100) for bag-of-words ORs (the 28 pubmed_mini topic titles) and
   Boolean/field/truncation queries (`bench_search.BOOLEAN_QUERIES`), with and without the exact
   total count, for each `--stopwords` list the engine ignores (default: none, then PubMed's);
5. a reward batch end to end: 512 GRPO-like answers (`bench_reward.make_answers`) scored by the
   RewardManager (deduplicated searches, `--reward-threads` threads) at recall@k: wall and CPU.
With `--shards 1,2` each shard count is its own index of the same records; a sharded index is
queried with one search thread (the shards one after the other) and with one per shard.

The load average is printed at each step: on a shared machine it says how pessimistic the
times are. Usage:

    python scripts/bench_search_scale.py --records 5000000 --workdir /tmp/scale --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from bench_search import BOOLEAN_QUERIES, bow_query, pct  # scripts/ (this script's folder is on sys.path)
from deepretrieval.search.ingest import read_pubmed_xml
from deepretrieval.search.local import LocalSearchEngine
from deepretrieval.search.local_index import (INDEX_META_FILE, SHARD_HASH, index_size_bytes, make_analyzer,
                                              shard_dir_name, shard_of)

ROOT = Path(__file__).resolve().parents[1]
from deepretrieval.search.mirror import Counts, MirrorWriter, ingest_pubmed  # noqa: E402
from deepretrieval.search.synthetic import CorpusProfile, generate, pubmed_xml  # noqa: E402

DATA = ROOT / "data" / "pubmed_mini"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load()}] {msg}", flush=True)


def profile(workdir: Path) -> CorpusProfile:
    cached = workdir / "profile.pkl"
    if cached.exists():
        return pickle.loads(cached.read_bytes())
    prof = CorpusProfile.from_corpus(DATA / "corpus.jsonl.gz")
    cached.write_bytes(pickle.dumps(prof))
    return prof


def bench_xml(prof: CorpusProfile, n: int, workdir: Path, threads: int, heap: int, files: int = 4,
              parse_workers: Sequence[int] = (0, 1)) -> Dict[str, Any]:
    """Reader and full-ingest throughput on n synthetic records in `files` baseline files: the reader's
    CPU per record, then one mirror per `parse_workers` value (0: parsed in the applying process; N:
    N worker processes parse the next files meanwhile), with the speed-up over the first."""
    import gzip

    records = [r for chunk in generate(n, prof, seed=1) for r in chunk]
    per = -(-n // files)
    paths = []
    for i in range(files):
        path = workdir / f"pubmed99n{i + 1:04d}.xml.gz"
        path.write_bytes(gzip.compress(pubmed_xml(records[i * per:(i + 1) * per]).encode(), compresslevel=6))
        paths.append(path)
    t0 = time.process_time()
    parsed = sum(1 for _ in read_pubmed_xml(paths[0]))
    parse_s = time.process_time() - t0  # CPU time: the reader is single-threaded
    out: Dict[str, Any] = {"records": n, "files": files, "file_bytes": sum(p.stat().st_size for p in paths),
                           "parse_records_per_cpu_s": parsed / parse_s, "ingest": {}}
    for workers in parse_workers:
        mirror = workdir / "xml_mirror"
        shutil.rmtree(mirror, ignore_errors=True)
        summary = ingest_pubmed(mirror, paths, heap_size=heap, num_threads=threads, progress=False,
                                parse_workers=workers)
        out["ingest"][str(workers)] = {"records_per_s": n / summary["seconds"], "seconds": summary["seconds"],
                                       "load": load()}
        shutil.rmtree(mirror, ignore_errors=True)
    first = out["ingest"][str(parse_workers[0])]["seconds"]
    for workers in parse_workers:
        out["ingest"][str(workers)]["speedup"] = first / out["ingest"][str(workers)]["seconds"]
    for path in paths:
        path.unlink()
    return out


def build_part(prof: CorpusProfile, ids: Sequence[int], out: Path, threads: int, heap: int, commit_every: int,
               seed: int, all_field: bool = True) -> Dict[str, Any]:
    """Stream generated records with these ids into a new (unsharded) mirror index at `out` (with the
    combined field unless `all_field` is false); generation and indexing timed apart (wall and CPU)."""
    shutil.rmtree(out, ignore_errors=True)
    writer = MirrorWriter(out, heap_size=heap, num_threads=threads, all_field=all_field)
    counts = Counts()
    gen_s = index_s = gen_cpu = 0.0
    since = done = 0
    t_all, cpu_all = time.perf_counter(), time.process_time()  # process CPU: every thread, tantivy's too
    stream = generate(len(ids), prof, seed=seed)
    while True:
        t0, c0 = time.perf_counter(), time.thread_time()
        chunk = next(stream, None)
        if chunk is not None:
            for rec, pmid in zip(chunk, ids[done:done + len(chunk)]):
                rec.id = str(pmid)
        gen_s += time.perf_counter() - t0
        gen_cpu += time.thread_time() - c0
        if chunk is None:
            break
        t0 = time.perf_counter()
        writer.apply(chunk, counts)
        done += len(chunk)
        since += len(chunk)
        if since >= commit_every:
            writer.commit(None, counts)
            counts = Counts()
            since = 0
        index_s += time.perf_counter() - t0
        if since == 0:
            log(f"{out.name}: committed {writer.num_docs:,} docs; generate {gen_s:.0f}s, index {index_s:.0f}s")
    t0 = time.perf_counter()
    writer.commit(None, counts)
    writer.close()
    index_s += time.perf_counter() - t0
    return {"records": len(ids), "generate_s": gen_s, "generate_cpu_s": gen_cpu, "index_s": index_s,
            "index_cpu_s": time.process_time() - cpu_all - gen_cpu, "wall_s": time.perf_counter() - t_all,
            "load": load()}


def build(prof: CorpusProfile, n: int, out: Path, threads: int, heap: int, commit_every: int, shards: int,
          all_field: bool = True) -> Dict[str, Any]:
    """An index of records 1..n: one mirror, or `shards` shards (split by `local_index.shard_of`,
    as `build_index` and sharded mirrors do) each built by its own process, under one metadata
    file in `build_index`'s sharded layout."""
    from multiprocessing import get_context

    shutil.rmtree(out, ignore_errors=True)
    if shards == 1:
        parts = [build_part(prof, range(1, n + 1), out, threads, heap, commit_every, 0, all_field)]
    else:
        out.mkdir(parents=True)
        ctx = get_context("fork")
        procs = []
        for i in range(shards):
            ids = [pmid for pmid in range(1, n + 1) if shard_of(str(pmid), shards) == i]
            result = out / f".part-{i}.json"
            proc = ctx.Process(target=_build_child, args=(prof, ids, out / shard_dir_name(i), threads, heap,
                                                          commit_every, i, result, all_field))
            proc.start()
            procs.append((proc, result))
        parts = []
        for proc, result in procs:
            proc.join()
            if proc.exitcode != 0:
                raise RuntimeError(f"shard build failed (exit code {proc.exitcode})")
            parts.append(json.loads(result.read_text()))
            result.unlink()
        write_top_meta(out, shards)
    size = index_size_bytes(out)
    wall = max(p["wall_s"] for p in parts)
    return {"records": n, "shards": shards, "all_field": all_field, "processes": len(parts), "threads_per_process": threads,
            "heap_mb": heap // 1_000_000, "wall_s": wall, "docs_per_s": n / wall,
            "generate_cpu_us_per_record": 1e6 * sum(p["generate_cpu_s"] for p in parts) / n,
            "index_cpu_us_per_record": 1e6 * sum(p["index_cpu_s"] for p in parts) / n,
            "index_bytes": size, "bytes_per_record": size / n, "parts": parts, "load": load()}


def write_top_meta(out: Path, shards: int) -> int:
    """The sharded index's top-level metadata from its shards' (each written at its last commit,
    so a build stopped part-way opens with what it committed); returns the documents."""
    metas = [json.loads((out / shard_dir_name(i) / INDEX_META_FILE).read_text()) for i in range(shards)]
    top = {**metas[0], "num_docs": sum(m["num_docs"] for m in metas),
           "shards": [shard_dir_name(i) for i in range(shards)], "shard_docs": [m["num_docs"] for m in metas],
           "shard_hash": SHARD_HASH}
    (out / INDEX_META_FILE).write_text(json.dumps(top, indent=1))
    return top["num_docs"]


def _build_child(prof, ids, out, threads, heap, commit_every, seed, result, all_field) -> None:
    result.write_text(json.dumps(build_part(prof, ids, out, threads, heap, commit_every, seed, all_field)))


def timed(fn: Callable[[str], Any], queries: Sequence[str], repeat: int) -> Dict[str, Any]:
    """p50/p95/max (ms) over every timed call, and each query's median ("slowest": the 3 slowest
    queries, which are what a p95 over a dozen queries is made of)."""
    for q in queries:  # warm-up: truncation cache, OS page cache
        fn(q)
    times: List[float] = []
    per_query: Dict[str, List[float]] = {q: [] for q in queries}
    for _ in range(repeat):
        for q in queries:
            t0 = time.perf_counter()
            fn(q)
            times.append((time.perf_counter() - t0) * 1000)
            per_query[q].append(times[-1])
    medians = sorted(((statistics.median(v), q) for q, v in per_query.items()), reverse=True)
    return {"p50_ms": statistics.median(times), "p95_ms": pct(times, 0.95), "max_ms": max(times), "n": len(times),
            "slowest": [{"ms": round(ms, 2), "query": q[:120]} for ms, q in medians[:3]]}


def bench_queries(index: Path, repeat: int, search_threads: int, stopwords: str = "none") -> Dict[str, Any]:
    """p50/p95 at k = 100, with and without the exact count, shards searched by `search_threads`, the
    engine ignoring the `stopwords` list (search.text.STOPWORD_LISTS; the BoW queries keep every title
    word, so with "pubmed" the engine drops PubMed's stopwords from them)."""
    topics = [json.loads(line) for line in (DATA / "topics.jsonl").open()]
    analyzer = make_analyzer()
    bow = [bow_query(t["title"], analyzer) for t in topics]
    engine = LocalSearchEngine(index, search_threads=search_threads, stopwords=stopwords)
    out: Dict[str, Any] = {"num_docs": engine.num_docs, "shards": engine.num_shards, "search_threads": search_threads,
                           "stopwords": stopwords}
    for name, queries in (("bow", bow), ("boolean", BOOLEAN_QUERIES)):
        for count in (True, False):
            key = f"{name}_{'count' if count else 'topk'}"
            out[key] = {**timed(lambda q, c=count: engine.search(q, k=100, count=c), queries, repeat), "load": load()}
            log(f"{key} (stopwords {stopwords}): {json.dumps(out[key])}")
    out["bow_total_median"] = statistics.median(engine.count(q) for q in bow)
    out["boolean_total_median"] = statistics.median(engine.count(q) for q in BOOLEAN_QUERIES)
    return out


def bench_reward(index: Path, threads: int, repeats: int, k: int, stopwords: str = "none") -> Dict[str, Any]:
    """One GRPO-like batch of 512 answers (`bench_reward.make_answers`: pubmed_mini topics, repeats
    and malformed answers) scored by the RewardManager against `index` at recall@k: wall and
    process CPU seconds of the first (cold) and later (warm) runs. The topics' relevant PMIDs are
    not in a synthetic corpus, so the rewards are meaningless; the searches are real."""
    from bench_reward import make_answers

    from deepretrieval.data import tasks
    from deepretrieval.rewards import literature
    from deepretrieval.rewards.manager import RewardManager

    splits = tasks.build_splits("pubmed_mini")
    texts, truths, infos = zip(*make_answers(splits["train"] + splits["test"], 512, 0.5, 0.06, 0))
    engine = LocalSearchEngine(index, stopwords=stopwords)
    literature.set_engine("pubmed_mini", engine)
    try:
        manager = RewardManager(None, config={"num_workers": threads,
                                              "pubmed_mini": {"engine": "local", "k": k, "index_dir": str(index)}})
        runs = []
        for _ in range(1 + repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            manager.score_texts(list(texts), ["pubmed_mini"] * len(texts), list(truths), list(infos))
            runs.append({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "load": load()})
        stats = manager.last_search_stats
    finally:
        literature.set_engine("pubmed_mini", None)
    return {"answers": len(texts), "k": k, "threads": threads, "shards": engine.num_shards, "stopwords": stopwords,
            "searches": int(stats.get("searches", 0)), "cold": runs[0], "warm": runs[1:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=5_000_000)
    ap.add_argument("--workdir", default="/tmp/bench_search_scale")
    ap.add_argument("--shards", default="1", help="comma-separated shard counts: one index of --records each")
    ap.add_argument("--threads", type=int, default=2, help="tantivy indexing threads")
    ap.add_argument("--heap-mb", type=int, default=1000, help="indexing memory budget (all threads)")
    ap.add_argument("--commit-every", type=int, default=1_000_000)
    ap.add_argument("--xml-records", type=int, default=20_000, help="records in the synthetic baseline files (0: skip)")
    ap.add_argument("--xml-files", type=int, default=4, help="baseline files the --xml-records are split into")
    ap.add_argument("--parse-workers", default="0,1",
                    help="comma-separated ingest_pubmed parse_workers values, each timed on the same files")
    ap.add_argument("--reuse-index", action="store_true", help="query an index built by an earlier run")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes over each query set")
    ap.add_argument("--reward-threads", type=int, default=2)
    ap.add_argument("--reward-repeats", type=int, default=1)
    ap.add_argument("--reward-k", default="100", help="comma-separated recall@k of the reward batch (PubMed task: 3000)")
    ap.add_argument("--stopwords", default="none,pubmed",
                    help="comma-separated stopword lists the engine ignores, each measured (search.text.STOPWORD_LISTS)")
    ap.add_argument("--no-all-field", dest="all_field", action="store_false",
                    help="build without the combined field (local_index.ALL_TEXT_FIELD): the per-field index")
    ap.add_argument("--skip-reward", action="store_true")
    ap.add_argument("--skip-queries", action="store_true", help="build only")
    ap.add_argument("--json", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    heap = args.heap_mb * 1_000_000
    out: Dict[str, Any] = {"cpus": len(os.sched_getaffinity(0)), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime())}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    log(f"cpus {out['cpus']}; profile")
    t0 = time.perf_counter()
    prof = profile(work)
    out["profile_s"] = time.perf_counter() - t0
    if args.xml_records:
        out["xml"] = bench_xml(prof, args.xml_records, work, args.threads, heap, args.xml_files,
                               [int(x) for x in args.parse_workers.split(",")])
        log(f"xml: {json.dumps(out['xml'])}")
        save()
    for shards in [int(x) for x in args.shards.split(",")]:
        index = work / (f"index_{args.records}" + (f"_{shards}shards" if shards > 1 else "")
                        + ("" if args.all_field else "_fields"))
        row: Dict[str, Any] = out.setdefault("by_shards", {}).setdefault(str(shards), {})
        if args.reuse_index and shards > 1 and not (index / INDEX_META_FILE).exists():
            row["partial_build_docs"] = write_top_meta(index, shards)  # a build stopped part-way
            log(f"{index}: the shards' committed {row['partial_build_docs']:,} documents")
        if not (args.reuse_index and index.exists()):
            row["build"] = build(prof, args.records, index, args.threads, heap, args.commit_every, shards,
                                 args.all_field)
            log(f"build: {json.dumps(row['build'])}")
            save()
        if args.skip_queries:
            continue
        lists = args.stopwords.split(",")
        suffix = {name: "" if name == "none" else f"_stop_{name}" for name in lists}  # "none": the earlier keys
        for name in lists:
            for threads in sorted({1, shards}, reverse=True):
                row[f"queries_{threads}_threads{suffix[name]}"] = bench_queries(index, args.repeat, threads, name)
                save()
        for k in ([] if args.skip_reward else [int(x) for x in args.reward_k.split(",")]):
            for name in lists:
                log(f"reward batch, k={k}, stopwords {name}")
                key = f"reward_k{k}{suffix[name]}"
                row[key] = bench_reward(index, args.reward_threads, args.reward_repeats, k, name)
                log(f"reward: {json.dumps(row[key])}")
                save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
