"""Evaluation runs: samples of a task, a query-writing method, the task's engine, per-sample records.

    samples  = load_samples("trials_sigir", split="test")         # eval.samples; or parquet=, topics=
    method   = BaselineMethod("original")                          # eval.methods: | LLMMethod | ModelMethod
    records  = evaluate(samples, method, out_dir="outputs/eval")  # per-sample JSONL, resumable
    summary  = summarize(records, ...)                             # see deepretrieval.eval.report

One sample = one topic of a test split. A method writes n >= 1 queries per topic (a text to parse
or a query); each is searched with the task's engine (the reward's source configuration:
local tasks recall@100, live tasks recall@3000 by default) and scored with recall/precision@K
and, where graded judgements exist, NDCG@K.

Error classes per query (what goes in the record's `error`):
  none                          searched; metrics computed
  format | json | empty_query   the response has no usable query (rewards.parsing): scores 0
  empty_answer                  (strict_json sources) a blank <answer> block: scores 0
  query_syntax                  the engine rejected the query: scores 0
  search_unavailable            the engine could not answer          } not the query writer's
  llm_unavailable | llm_request_rejected | llm_bad_response          } fault: left out of the
  generation_error              the local model failed to generate   } means, counted, retried
                                                                        on the next run
Evaluation is lenient about tags: a response whose `<answer>` parses is searched even if the
`<think>` tags are off (the reward penalises that; a recall table measures the query). The record
keeps `format_ok` so the strict view can be recomputed.

Resume: records are appended (one JSON line, flushed) as each query finishes, to
`<out_dir>/samples/<task>/<method>.jsonl` (a topics file's suite: `<task>_<name>`). A re-run with
the same method settings, K and engine (the `fingerprint`) reuses finished records and only generates what is missing or failed for
infrastructure reasons; a different fingerprint starts the file afresh. Each record carries its
topic's `topic_digest` (text, prompt, judgements, reference queries): a topic whose digest changed
(an edited topics file) is redone. Searches also go through
a SQLite search cache (deepretrieval.search.cache) so repeated queries cost nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from deepretrieval.eval.methods import Generation, QueryMethod, slug, split_reasoning
from deepretrieval.eval.samples import EvalSample
from deepretrieval.eval.searcher import Searcher
from deepretrieval.search.metrics import query_metrics

logger = logging.getLogger(__name__)

INFRA_ERRORS = frozenset(
    {"search_unavailable", "llm_unavailable", "llm_request_rejected", "llm_bad_response", "generation_error"}
)
WRITER_ERRORS = frozenset({"format", "json", "empty_query", "query_syntax", "empty_answer"})


# ------------------------------------------------------------------------- the per-sample store


class RecordStore:
    """Append-only JSONL of finished queries, keyed by `key`; a truncated last line is skipped."""

    def __init__(self, path: "str | os.PathLike[str]", fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.records: Dict[str, Dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stale = False
        if self.path.exists():
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # the line an interrupted run was writing
                    if rec.get("fingerprint") != fingerprint:
                        stale = True
                        continue
                    self.records[rec["key"]] = rec
        if stale and not self.records:
            logger.info("%s holds results of other settings; starting it afresh", self.path)
            self.path.unlink()
        elif stale:
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for rec in self.records.values():
                handle.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)

    def done(self, key: str, digest: Optional[str] = None) -> bool:
        """Whether `key` has a finished record (of the topic as it is now: its `topic_digest` is
        `digest`, when given)."""
        rec = self.records.get(key)
        return (rec is not None and rec.get("error") not in INFRA_ERRORS
                and (digest is None or rec.get("topic_digest") == digest))

    def add(self, rec: Dict[str, Any]) -> None:
        rec = dict(rec, fingerprint=self.fingerprint)
        with open(self.path, "a", encoding="utf-8") as handle:
            # flushed per record: a killed process loses nothing written (no fsync: surviving a
            # power cut is not worth a disk sync per query)
            handle.write(json.dumps(rec, ensure_ascii=False) + "\n")
            handle.flush()
        self.records[rec["key"]] = rec


def fingerprint_of(method: QueryMethod, task: str, k: int, engine_id: str, ks: Sequence[int]) -> str:
    blob = json.dumps(
        {"method": method.spec(), "task": task, "k": k, "engine": engine_id, "ks": sorted(ks)},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def topic_digest(sample: EvalSample) -> str:
    """16 hex digits of the SHA-256 of what a topic's records depend on besides the method: its
    prompt and input text, its relevant ids and graded judgements, and the reference queries the
    baselines read (`boolean_query`, `reference_queries`). A record of another digest (an edited
    topics file, or a record written before records carried one) is redone."""
    topic = sample.topic or {}
    blob = json.dumps(
        {"prompt": sample.prompt, "input": sample.need_text, "relevant": sorted(set(sample.relevant)),
         "judgements": sample.judgements,
         "references": {name: topic.get(name) for name in ("boolean_query", "reference_queries")}},
        sort_keys=True, default=str, ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------- evaluation


def default_ks(k: int) -> List[int]:
    """Cut-offs reported: 10 and 100 where below K, and K itself."""
    return sorted({c for c in (10, 100) if c < k} | {k})


def score_generation(
    sample: EvalSample, gen: Generation, searcher: Searcher, ks: Sequence[int], k: Optional[int] = None
) -> Dict[str, Any]:
    """Parse (if needed), search and score one generation; returns the record body (`recall` is
    recall@k, default the largest cut-off)."""
    from deepretrieval.rewards.literature import format_flags, searched_query
    from deepretrieval.rewards.parsing import check_format, parse_answer, parse_answer_strict

    rec: Dict[str, Any] = {"reasoning": None, "query": None, "response": None, "format_ok": None,
                           "ids": [], "error": "none", "detail": "", "cached_search": False}
    if gen.error:
        rec.update(error=gen.error, detail=gen.detail)
        return rec
    query = gen.query
    if gen.text is not None:
        src = searcher.source(sample.task)
        # the reward's flags for the row; a generation that knows who opened <think> (or whether
        # it was asked to reason) says so, where the source does not set the flag: as in the
        # reward, a configured source setting wins
        reasoning, think_in_prompt = format_flags(src, sample.extra_info)
        if gen.think_in_prompt is not None and src.think_in_prompt is None:
            think_in_prompt = gen.think_in_prompt
        if gen.reasoning is not None and src.reasoning is None:
            reasoning = gen.reasoning
        rec["response"] = gen.text
        rec["reasoning"] = split_reasoning(gen.text)
        rec["format_ok"] = check_format(gen.text, think_in_prompt=think_in_prompt, reasoning=reasoning)[0]
        # the source's strict_json: the original's json.loads reading (its eval script read answers so)
        parsed = parse_answer_strict(gen.text) if src.strict_json else parse_answer(gen.text)
        if parsed.error != "none":
            rec.update(error=parsed.error, detail=parsed.detail)
        query = parsed.query
    rec["query"] = query
    if rec["error"] == "none":
        # what the reward would search for this query (the input's words OR the query, where the
        # prompt style adds the answer to the input); recorded when it differs from the query
        searched = searched_query(query, sample.extra_info, gen.expands if gen.text is not None else False)
        if searched != query:
            rec["searched_query"] = searched
        ids, error, detail, cached = searcher.search(sample, searched or "")
        rec.update(ids=ids, error=error, detail=detail, cached_search=cached)
    if rec["error"] in INFRA_ERRORS:
        return rec
    ranked = rec["ids"] if rec["error"] == "none" else []
    metrics = query_metrics(ranked, sample.relevant, ks, judgements=sample.judgements)
    rec["metrics"] = metrics
    rec["recall"] = metrics.get(f"recall@{k or max(ks)}")
    return rec


def evaluate(
    samples: Sequence[EvalSample],
    method: QueryMethod,
    out_dir: "str | os.PathLike[str]",
    searcher: Optional[Searcher] = None,
    k: Optional[int] = None,
    ks: Optional[Sequence[int]] = None,
    chunk_size: int = 16,
    progress: bool = True,
    max_chunks: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """Evaluate `method` on `samples`; returns one record per (topic, sample index).

    Samples of several tasks may be mixed; each task (or suite of topics: `EvalSample.label`) gets
    its own record file, and its records' `task` is that label. Generation runs in
    chunks of `chunk_size` topics and each chunk's records are written before the next starts, so
    an interrupted run loses at most one chunk. `max_chunks` stops early (used by tests to
    simulate an interruption).
    """
    searcher = searcher or Searcher(k=k)
    by_label: Dict[str, List[EvalSample]] = {}
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    folders: Dict[str, str] = {}
    for label in by_label:  # two labels in one record file would drop each other's records as stale
        if folders.setdefault(slug(label), label) != label:
            raise ValueError(f"the suites {folders[slug(label)]!r} and {label!r} would share the record "
                             f"folder {slug(label)!r}; name them apart")
    out: List[Dict[str, Any]] = []
    chunks_run = 0
    for label, task_samples in by_label.items():
        task = task_samples[0].task  # one label, one task (a suite is named after its task)
        src = searcher.source(task)
        # cut-offs above K would repeat recall@K: the engine returns at most K ids
        cut = sorted({c for c in (ks or default_ks(src.k)) if c <= src.k} | {src.k})
        engine_ident = searcher.engine_id(task) + (":strict_json" if getattr(src, "strict_json", False) else "")
        fp = fingerprint_of(method, label, src.k, engine_ident, cut)
        store = RecordStore(Path(out_dir) / "samples" / slug(label) / f"{slug(method.name)}.jsonl", fp)
        # what produced the records, next to them (the spec never holds credentials)
        store.path.with_suffix(".spec.json").write_text(json.dumps(
            {"fingerprint": fp, "method": method.spec(), "task": label, "k": src.k, "ks": cut,
             "engine": searcher.engine_id(task)}, indent=2, default=str) + "\n")
        n = max(1, int(getattr(method, "n", 1)))
        digests = {s.topic_id: topic_digest(s) for s in task_samples}
        pending = [s for s in task_samples
                   if not all(store.done(f"{s.topic_id}#{i}", digests[s.topic_id]) for i in range(n))]
        if len(pending) < len(task_samples):
            logger.info("%s/%s: %d of %d topics already done (resuming)", label, method.name,
                        len(task_samples) - len(pending), len(task_samples))
        bar = None
        if progress and pending:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc=f"{label}/{method.name}", unit="topic")
        # a method may prefer its own chunk (a model: one generation batch, so progress is saved
        # batch by batch)
        step = int(getattr(method, "chunk_size", None) or chunk_size)
        for start in range(0, len(pending), step):
            if max_chunks is not None and chunks_run >= max_chunks:
                break
            chunk = pending[start : start + step]
            t0 = time.perf_counter()
            try:
                generations = method.generate(chunk)
            except Exception as exc:  # a generation failure is counted for the chunk, not fatal
                logger.exception("%s: generation failed for %d topics", method.name, len(chunk))
                generations = [[Generation(error="generation_error", detail=f"{type(exc).__name__}: {exc}")] * n
                               for _ in chunk]
            gen_time = (time.perf_counter() - t0) / max(1, len(chunk))
            jobs = []
            for sample, gens in zip(chunk, generations):
                for i, gen in enumerate(gens[:n]):
                    key = f"{sample.topic_id}#{i}"
                    if store.done(key, digests[sample.topic_id]):
                        continue
                    base = {"key": key, "task": label, "method": method.name, "topic_id": sample.topic_id,
                            "sample": i, "k": src.k, "n_relevant": len(set(sample.relevant)),
                            "generation_s": round(gen_time, 4), "topic_digest": digests[sample.topic_id]}
                    jobs.append((base, sample, gen))

            def finish(job: Tuple[Dict[str, Any], EvalSample, Generation], cut=cut, src=src) -> Dict[str, Any]:
                base, sample, gen = job
                if gen.not_applicable:
                    return dict(base, error="not_applicable", query=None, ids=[], metrics=None, recall=None)
                return dict(base, **score_generation(sample, gen, searcher, cut, src.k))

            threads = min(searcher.threads_for(task), len(jobs)) if jobs else 1
            if threads <= 1:
                for job in jobs:
                    store.add(finish(job))
            else:
                with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="eval-search") as pool:
                    for rec in pool.map(finish, jobs):  # in order; each written as soon as its turn comes
                        store.add(rec)
            chunks_run += 1
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        keys = [(f"{s.topic_id}#{i}", digests[s.topic_id]) for s in task_samples for i in range(n)]
        # a record of the topic as it was (not redone: an interrupted run) is not the topic's
        out.extend(store.records[k_] for k_, digest in keys
                   if store.records.get(k_, {}).get("topic_digest") == digest)
    return out
