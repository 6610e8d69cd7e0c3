"""Evaluation runs: samples of a task, a query-writing method, the task's engine, per-sample records.

    samples  = load_samples("trials_sigir", split="test")         # or load_samples(parquet=...)
    method   = BaselineMethod("original")                          # | LLMMethod | ModelMethod
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
`<out_dir>/samples/<task>/<method>.jsonl`. A re-run with the same method settings, K and engine
(the `fingerprint`) reuses finished records and only generates what is missing or failed for
infrastructure reasons; a different fingerprint starts the file afresh. Searches also go through
a SQLite search cache (deepretrieval.search.cache) so repeated queries cost nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from deepretrieval.data.dataset import plain_python
from deepretrieval.eval import baselines
from deepretrieval.eval.metrics import query_metrics

logger = logging.getLogger(__name__)

INFRA_ERRORS = frozenset(
    {"search_unavailable", "llm_unavailable", "llm_request_rejected", "llm_bad_response", "generation_error"}
)
WRITER_ERRORS = frozenset({"format", "json", "empty_query", "query_syntax", "empty_answer"})


# ------------------------------------------------------------------------- samples


@dataclass
class EvalSample:
    """One topic to evaluate, built from a verl parquet row (plus its vendored topic record)."""

    task: str  # the data source: pubmed_mini | trials_sigir | pubmed | ctgov
    topic_id: str
    row: Dict[str, Any]  # the verl row (prompt, reward_model, extra_info, data_source)
    relevant: List[str]
    judgements: Optional[Dict[str, int]] = None
    need_text: str = ""
    pico: Optional[Dict[str, str]] = None
    topic: Optional[Dict[str, Any]] = None
    example_query: Optional[str] = None  # reference query used when this topic is a few-shot example

    @property
    def data_source(self) -> str:
        return self.task

    @property
    def prompt(self) -> List[Dict[str, str]]:
        return list(self.row.get("prompt") or [])

    @property
    def extra_info(self) -> Dict[str, Any]:
        return dict(self.row.get("extra_info") or {})

    @property
    def ground_truth(self) -> Dict[str, Any]:
        return dict((self.row.get("reward_model") or {}).get("ground_truth") or {})




def task_input_from_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The information need inside a task prompt: the text after the task's input introduction."""
    from deepretrieval.data.prompts import TASK_TEXT

    content = next((m["content"] for m in reversed(list(messages)) if m.get("role") == "user"), "")
    for text in TASK_TEXT.values():
        marker = text["input_intro"] + "\n"
        if marker in content:
            return content.rsplit(marker, 1)[1].strip()
    return content.strip()


def parse_pico(text: str) -> Optional[Dict[str, str]]:
    """`P: ...\\nI: ...` -> {"P": ..., ...}, or None when the text is not a PICO block."""
    fields = dict(re.findall(r"^([PICO]):\s*(.*)$", text, flags=re.M))
    return fields if {"P", "I"} <= set(fields) else None


_TOPICS_CACHE: Dict[str, Dict[str, Dict[str, Any]]] = {}


def vendored_topics(task: str) -> Dict[str, Dict[str, Any]]:
    """topic_id -> topic record of a vendored local task ({} for the live tasks)."""
    files = {"pubmed_mini": "pubmed_mini/topics.jsonl", "trials_sigir": "trials_sigir/topics.jsonl"}
    if task not in files:
        return {}
    if task not in _TOPICS_CACHE:
        from deepretrieval.data.paths import data_root
        from deepretrieval.data.tasks import read_jsonl

        path = data_root() / files[task]
        _TOPICS_CACHE[task] = {str(t["topic_id"]): t for t in read_jsonl(path)} if path.exists() else {}
    return _TOPICS_CACHE[task]


def _example_query(sample: EvalSample) -> Optional[str]:
    """The reference query shown when this topic is a few-shot example."""
    if sample.task == "pubmed_mini":
        return baselines.baseline_query("expert_boolean", sample)
    if sample.task == "trials_sigir":
        return baselines.baseline_query("gpt4_conditions", sample)
    return None


def sample_from_row(row: Mapping[str, Any]) -> EvalSample:
    """A verl parquet row -> EvalSample (joins the vendored topic record by `extra_info.topic_id`)."""
    from deepretrieval.data.tasks import judgements_from_ground_truth

    from deepretrieval.data.dataset import row_extra_info

    row = plain_python(dict(row))
    row["extra_info"] = row_extra_info(row)  # original-format rows: top-level pub_date, original prompt
    task = str(row.get("data_source"))
    extra = row.get("extra_info") or {}
    gt = (row.get("reward_model") or {}).get("ground_truth") or {}
    topic_id = str(extra.get("topic_id", extra.get("index", "")))
    need = task_input_from_prompt(row.get("prompt") or [])
    sample = EvalSample(
        task=task,
        topic_id=topic_id,
        row=row,
        relevant=[str(t) for t in (gt.get("target") or [])],
        judgements=judgements_from_ground_truth(gt) if gt.get("judged") is not None else None,
        need_text=need,
        pico=parse_pico(need) if task in ("pubmed", "ctgov") else None,
        topic=vendored_topics(task).get(topic_id),
    )
    sample.example_query = _example_query(sample)
    return sample


def load_samples(
    task: Optional[str] = None,
    split: str = "test",
    parquet: "str | os.PathLike[str] | Sequence[str] | None" = None,
    limit: Optional[int] = None,
    **task_options: Any,
) -> List[EvalSample]:
    """Samples from parquet file(s), or from the task's own split (`split`: train | test | val | all).

    `all` is train + test: every topic of a vendored task (what the reference baselines in
    docs/evaluation.md use). `task_options` go to deepretrieval.data.tasks.build_splits (seed, ...).
    """
    rows: List[Dict[str, Any]] = []
    if parquet is not None:
        import pandas as pd

        files = [parquet] if isinstance(parquet, (str, os.PathLike)) else list(parquet)
        for f in files:
            rows.extend(pd.read_parquet(f).to_dict(orient="records"))
        if task is not None:
            rows = [r for r in rows if str(r.get("data_source")) == task]
    else:
        if task is None:
            raise ValueError("give a task or a parquet file")
        from deepretrieval.data.tasks import build_splits

        splits = build_splits(task, **task_options)
        names = ("train", "test") if split == "all" else (split,)
        for name in names:
            if name not in splits:
                raise ValueError(f"task {task!r} has no {name!r} split")
            rows.extend(splits[name])
        rows.sort(key=lambda r: str((r.get("extra_info") or {}).get("topic_id")))
    samples = [sample_from_row(r) for r in rows]
    return samples[:limit] if limit is not None else samples


# ------------------------------------------------------------------------- generations


@dataclass
class Generation:
    """One written query: a response `text` to parse, or a `query` given directly, or an error."""

    text: Optional[str] = None
    query: Optional[str] = None
    error: Optional[str] = None
    detail: str = ""
    not_applicable: bool = False
    # whether the prompt opened <think> for the model (None: the row's extra_info says); an API
    # chat model gets no assistant prefix, so it writes its own <think>
    think_in_prompt: Optional[bool] = None


def split_reasoning(text: str) -> str:
    """The reasoning part of a response: everything before `</think>` (or before `<answer>`)."""
    for tag in ("</think>", "<answer>"):
        if tag in text:
            return text.split(tag, 1)[0].replace("<think>", "").strip()
    return ""


class QueryMethod:
    """A query writer under evaluation. Subclasses implement `generate` and `spec`."""

    name = "method"
    n = 1

    def spec(self) -> Dict[str, Any]:
        """Everything that changes the queries; part of the resume fingerprint."""
        return {"name": self.name}

    def generate(self, samples: Sequence[EvalSample]) -> List[List[Generation]]:
        raise NotImplementedError  # abstract


class BaselineMethod(QueryMethod):
    """A reference baseline from deepretrieval.eval.baselines (one deterministic query per topic)."""

    def __init__(self, baseline: str):
        if baseline not in baselines.BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; known: {', '.join(baselines.BASELINES)}")
        self.name = baseline
        self.n = baselines.baseline_slots(baseline)

    def spec(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": "baseline", "version": 1}

    def generate(self, samples: Sequence[EvalSample]) -> List[List[Generation]]:
        out = []
        for s in samples:
            q = baselines.baseline_query(self.name, s)
            queries = q if isinstance(q, list) else [q]
            out.append([Generation(query=x) if x else Generation(not_applicable=True) for x in queries])
        return out


class LLMMethod(QueryMethod):
    """An LLM behind an OpenAI-compatible endpoint, prompted in one of baselines.PROMPT_MODES.

    Few-shot examples come from `pool` (the other topics of the same task; never the topic itself).
    """

    def __init__(
        self,
        client: Any,
        mode: str = "zero_shot",
        n: int = 1,
        temperature: Optional[float] = None,
        shots: int = 3,
        pool: Sequence[EvalSample] = (),
        seed: int = 0,
        name: Optional[str] = None,
    ):
        if mode not in baselines.PROMPT_MODES:
            raise ValueError(f"unknown prompting mode {mode!r}; known: {', '.join(baselines.PROMPT_MODES)}")
        self.client, self.mode, self.n, self.shots, self.seed = client, mode, n, shots, seed
        self.temperature = temperature if temperature is not None else (0.0 if n == 1 else 1.0)
        self.pool = list(pool)
        self.name = name or f"llm-{_slug(client.model)}-{mode}"
        self._warned: set = set()

    def spec(self) -> Dict[str, Any]:
        return {
            "name": self.name, "kind": "llm", "model": self.client.model, "url": self.client.base_url,
            "mode": self.mode, "n": self.n, "temperature": self.temperature, "shots": self.shots,
            "seed": self.seed, "max_tokens": self.client.max_tokens,
        }

    def messages_for(self, sample: EvalSample) -> List[Dict[str, str]]:
        examples: List[EvalSample] = []
        if self.mode in ("few_shot", "icl_few_shot"):
            pool = [p for p in (self.pool or []) if p.task == sample.task]
            examples = baselines.pick_examples(pool, sample.topic_id, self.shots, self.seed)
            if len(examples) < self.shots and sample.task not in self._warned:
                self._warned.add(sample.task)
                logger.warning("%s: only %d few-shot examples with a reference query for task %s (wanted %d)",
                               self.name, len(examples), sample.task, self.shots)
        reasoning = sample.extra_info.get("prompt_style") != "no_reason"
        return baselines.build_llm_messages(sample, self.mode, examples, reasoning=reasoning)

    def generate(self, samples: Sequence[EvalSample]) -> List[List[Generation]]:
        convs = [self.messages_for(s) for s in samples]
        results = self.client.complete_many(convs, n=self.n, temperature=self.temperature)
        out = []
        for r in results:
            if not r.ok:
                out.append([Generation(error=r.error, detail=r.message)] * self.n)
            else:
                gens = [Generation(text=t, think_in_prompt=False) for t in r.texts[: self.n]]
                # an endpoint that ignores `n` answers with fewer choices: the service's shortfall
                gens += [Generation(error="llm_bad_response", detail=f"{len(r.texts)} of {self.n} choices")] * (
                    self.n - len(gens))
                out.append(gens)
        return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:80] or "model"


# ------------------------------------------------------------------------- searching


class Searcher:
    """Runs queries through the reward's engine for a data source, with the SQLite search cache."""

    def __init__(
        self,
        reward_config: Any = None,
        k: Optional[int] = None,
        cache: "bool | str | os.PathLike[str] | None" = None,
        engines: Optional[Mapping[str, Any]] = None,
        threads: Optional[int] = None,
    ):
        from deepretrieval.rewards.literature import resolve_config
        from deepretrieval.search.cache import resolve_cache

        if isinstance(reward_config, Mapping) and isinstance(reward_config.get("reward"), Mapping):
            reward_config = reward_config["reward"]  # a whole trainer config was given
        self.config = resolve_config(reward_config)
        self.k = k
        self.cache = resolve_cache(cache)
        self.engines = dict(engines or {})
        self.threads = threads

    def threads_for(self, task: str) -> int:
        """Searches run at once for a task: `threads`, else the reward manager's default per engine
        kind (the live engines wait on the network and rate-limit themselves)."""
        if self.threads:
            return max(1, int(self.threads))
        from deepretrieval.rewards.manager import DEFAULT_WORKERS

        src = self.source(task)
        return int(src.num_workers or DEFAULT_WORKERS.get(src.engine, 1))

    def source(self, task: str) -> Any:
        src = self.config.source(task)
        return dataclasses.replace(src, k=int(self.k)) if self.k else src

    def engine_id(self, task: str) -> str:
        """Identity of the engine for fingerprints and cache keys; a local index adds its build
        time, so rebuilding the index invalidates cached searches and finished records."""
        if task in self.engines:
            engine = self.engines[task]
            ident = f"custom:{getattr(engine, 'name', type(engine).__name__)}"
            index_dir = getattr(engine, "index_dir", None)
        else:
            src = self.source(task)
            ident = src.engine_key()
            index_dir = None
            if src.engine == "local":
                index_dir = dict(src.engine_options).get("index_dir")
                if index_dir is None:
                    # built now rather than at the first search, so the identity (with the build
                    # time) is the same before and after an interrupted first run
                    from deepretrieval.search.local_index import default_index_dir, ensure_local_index

                    try:
                        index_dir = ensure_local_index(src.index or src.name)
                    except Exception as exc:  # no corpus: every search will report it, classified
                        logger.warning("local index %s unavailable: %s", src.index or src.name, exc)
                        index_dir = default_index_dir(src.index or src.name)
        from deepretrieval.search.local_index import INDEX_META_FILE

        meta = Path(index_dir) / INDEX_META_FILE if index_dir else None
        if meta is not None and meta.exists():
            ident += f"|built:{meta.stat().st_mtime_ns}"
        return ident

    def filters(self, sample: EvalSample) -> Dict[str, Any]:
        src = self.source(sample.task)
        pub_date = sample.extra_info.get("pub_date")
        return {"max_date": str(pub_date)} if src.use_pub_date and pub_date else {}

    def search(self, sample: EvalSample, query: str) -> Tuple[List[str], str, str, bool]:
        """(ids, error, detail, cached) for `query`; errors classified, never raised."""
        from deepretrieval.rewards.literature import PreparedSample, get_engine, run_search
        from deepretrieval.search.base import SearchResult
        from deepretrieval.search.cache import cache_key

        src = self.source(sample.task)
        filters = self.filters(sample)
        key = cache_key(self.engine_id(sample.task), "", query, src.k, filters)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return [str(i) for i in hit.ids], "none", "", True
        prepared = PreparedSample(
            data_source=sample.task, format_ok=True, query=query, error="none", detail="",
            targets=sample.relevant, source=src, filters=filters,
        )
        try:
            engine = self.engines.get(sample.task) or get_engine(src)
        except Exception as exc:  # index missing, bad options: the engine is unavailable
            logger.exception("cannot create the engine for %s", sample.task)
            return [], "search_unavailable", f"engine: {exc}", False
        outcome = run_search(prepared, engine)
        if outcome.error == "none" and self.cache is not None:
            self.cache.put(key, SearchResult(ids=outcome.ids, total=outcome.total, query=query, engine=src.engine, k=src.k))
        return outcome.ids, outcome.error, outcome.detail, outcome.cached


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

    def done(self, key: str) -> bool:
        rec = self.records.get(key)
        return rec is not None and rec.get("error") not in INFRA_ERRORS

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


# ------------------------------------------------------------------------- evaluation


def default_ks(k: int) -> List[int]:
    """Cut-offs reported: 10 and 100 where below K, and K itself."""
    return sorted({c for c in (10, 100) if c < k} | {k})


def score_generation(
    sample: EvalSample, gen: Generation, searcher: Searcher, ks: Sequence[int], k: Optional[int] = None
) -> Dict[str, Any]:
    """Parse (if needed), search and score one generation; returns the record body (`recall` is
    recall@k, default the largest cut-off)."""
    from deepretrieval.rewards.parsing import check_format, parse_answer, parse_answer_strict

    rec: Dict[str, Any] = {"reasoning": None, "query": None, "response": None, "format_ok": None,
                           "ids": [], "error": "none", "detail": "", "cached_search": False}
    if gen.error:
        rec.update(error=gen.error, detail=gen.detail)
        return rec
    query = gen.query
    if gen.text is not None:
        think_in_prompt = gen.think_in_prompt
        if think_in_prompt is None:
            think_in_prompt = bool(sample.extra_info.get("think_in_prompt"))
        reasoning = sample.extra_info.get("prompt_style") != "no_reason"
        rec["response"] = gen.text
        rec["reasoning"] = split_reasoning(gen.text)
        rec["format_ok"] = check_format(gen.text, think_in_prompt=think_in_prompt, reasoning=reasoning)[0]
        # the source's strict_json: the original's json.loads reading (its eval script read answers so)
        strict = bool(getattr(searcher.source(sample.task), "strict_json", False))
        parsed = parse_answer_strict(gen.text) if strict else parse_answer(gen.text)
        if parsed.error != "none":
            rec.update(error=parsed.error, detail=parsed.detail)
        query = parsed.query
    rec["query"] = query
    if rec["error"] == "none":
        ids, error, detail, cached = searcher.search(sample, query or "")
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

    Samples of several tasks may be mixed; each task gets its own record file. Generation runs in
    chunks of `chunk_size` topics and each chunk's records are written before the next starts, so
    an interrupted run loses at most one chunk. `max_chunks` stops early (used by tests to
    simulate an interruption).
    """
    searcher = searcher or Searcher(k=k)
    by_task: Dict[str, List[EvalSample]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    out: List[Dict[str, Any]] = []
    chunks_run = 0
    for task, task_samples in by_task.items():
        src = searcher.source(task)
        # cut-offs above K would repeat recall@K: the engine returns at most K ids
        cut = sorted({c for c in (ks or default_ks(src.k)) if c <= src.k} | {src.k})
        engine_ident = searcher.engine_id(task) + (":strict_json" if getattr(src, "strict_json", False) else "")
        fp = fingerprint_of(method, task, src.k, engine_ident, cut)
        store = RecordStore(Path(out_dir) / "samples" / task / f"{_slug(method.name)}.jsonl", fp)
        # what produced the records, next to them (the spec never holds credentials)
        store.path.with_suffix(".spec.json").write_text(json.dumps(
            {"fingerprint": fp, "method": method.spec(), "task": task, "k": src.k, "ks": cut,
             "engine": searcher.engine_id(task)}, indent=2, default=str) + "\n")
        n = max(1, int(getattr(method, "n", 1)))
        pending = [s for s in task_samples if not all(store.done(f"{s.topic_id}#{i}") for i in range(n))]
        if len(pending) < len(task_samples):
            logger.info("%s/%s: %d of %d topics already done (resuming)", task, method.name,
                        len(task_samples) - len(pending), len(task_samples))
        bar = None
        if progress and pending:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc=f"{task}/{method.name}", unit="topic")
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
                    if store.done(key):
                        continue
                    base = {"key": key, "task": task, "method": method.name, "topic_id": sample.topic_id,
                            "sample": i, "k": src.k, "n_relevant": len(set(sample.relevant)),
                            "generation_s": round(gen_time, 4)}
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
        keys = [f"{s.topic_id}#{i}" for s in task_samples for i in range(n)]
        out.extend(store.records[k_] for k_ in keys if k_ in store.records)
    return out


# ------------------------------------------------------------------------- trained models


def resolve_model_dir(path: "str | os.PathLike[str]") -> Path:
    """A Hugging Face model folder from `path`: the folder itself (it has config.json), or a trainer
    checkpoint holding one (`global_step_N/actor/huggingface`, `.../hf`), or a checkpoint root
    (the step named in latest_checkpointed_iteration.txt, else the highest global_step_N)."""
    root = Path(path)
    if (root / "config.json").exists():
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"no model at {root}")
    latest = root / "latest_checkpointed_iteration.txt"
    steps = sorted(
        (p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"global_step_\d+", p.name)),
        key=lambda p: int(p.name.rsplit("_", 1)[1]),
    )
    if latest.exists() and (root / f"global_step_{latest.read_text().strip()}").is_dir():
        return resolve_model_dir(root / f"global_step_{latest.read_text().strip()}")
    if steps:
        return resolve_model_dir(steps[-1])
    for sub in ("actor/huggingface", "actor/hf", "huggingface", "hf", "actor"):
        if (root / sub / "config.json").exists():
            return root / sub
    raise FileNotFoundError(f"{root} is neither a Hugging Face model folder nor a checkpoint holding one")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401  (only whether it imports)
    except Exception:  # not installed, or installed without a usable GPU runtime
        return False
    return True


class ModelMethod(QueryMethod):
    """A (trained) query writer: a HF model folder or trainer checkpoint, prompted with the task's
    own prompt (chat template + assistant prefix, exactly as in training: data.dataset.RLHFDataset).

    Backends: `hf` generates with the trainer's rollout (workers.rollout.HFRollout) in batches on
    CPU or GPU; `vllm` uses vllm.LLM when the package is importable; `auto` picks vllm when
    importable and a GPU is present, else hf. Greedy (n=1, temperature 0) by default; n > 1 samples
    with `temperature`, and the report adds best-of-n next to the mean.
    """

    def __init__(
        self,
        model_path: "str | os.PathLike[str]",
        name: Optional[str] = None,
        backend: str = "auto",
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 512,
        max_prompt_length: int = 1024,
        batch_size: int = 8,
        device: Optional[str] = None,
        dtype: str = "auto",
        seed: int = 0,
    ):
        self.model_dir = resolve_model_dir(model_path)
        self.name = name or _slug(Path(model_path).name)
        self.n = max(1, int(n))
        self.temperature = float(temperature) if self.n > 1 else 0.0
        self.top_p, self.max_new_tokens, self.max_prompt_length = top_p, max_new_tokens, max_prompt_length
        self.batch_size, self.device, self.dtype, self.seed = batch_size, device, dtype, seed
        self.chunk_size = batch_size  # evaluate() saves records after every generation batch
        if backend == "auto":
            import torch

            backend = "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
        if backend not in ("hf", "vllm"):
            raise ValueError(f"backend must be hf, vllm or auto, not {backend!r}")
        if backend == "vllm" and not vllm_available():
            raise RuntimeError("backend vllm requested but vllm is not importable; use --backend hf")
        self.backend = backend
        self._model = self._tokenizer = self._llm = None

    def spec(self) -> Dict[str, Any]:
        weights = sorted(self.model_dir.glob("*.safetensors")) or sorted(self.model_dir.glob("*.bin"))
        stamp = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in weights]
        return {
            "name": self.name, "kind": "model", "path": str(self.model_dir.resolve()), "weights": stamp,
            "n": self.n, "temperature": self.temperature, "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens, "seed": self.seed,
        }

    # -- loading ---------------------------------------------------------------------------
    def _load_hf(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from deepretrieval.models.tokenizer import load_tokenizer

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        tok = load_tokenizer(self.model_dir, padding_side="left")
        dtype = {"auto": (torch.bfloat16 if device.startswith("cuda") else torch.float32),
                 "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=dtype)
        model.to(device).eval()
        self._model, self._tokenizer = model, tok

    def _dataset(self, samples: Sequence[EvalSample], tokenizer: Any) -> Any:
        """The task prompts rendered and tokenised exactly as the trainer does."""
        import tempfile

        import pandas as pd

        from deepretrieval.data.dataset import RLHFDataset

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rows.parquet"
            pd.DataFrame([s.row for s in samples]).to_parquet(path, index=False)
            return RLHFDataset(str(path), tokenizer, {"max_prompt_length": self.max_prompt_length,
                                                      "truncation": "left"})

    # -- generation ------------------------------------------------------------------------
    def generate(self, samples: Sequence[EvalSample]) -> List[List[Generation]]:
        texts = self._generate_vllm(samples) if self.backend == "vllm" else self._generate_hf(samples)
        return [[Generation(text=t) for t in texts[i * self.n : (i + 1) * self.n]] for i in range(len(samples))]

    def _generate_hf(self, samples: Sequence[EvalSample]) -> List[str]:
        import torch

        from deepretrieval.data.dataset import collate_fn
        from deepretrieval.protocol import Batch
        from deepretrieval.workers.rollout import HFRollout

        if self._model is None:
            self._load_hf()
        greedy = self.n == 1
        config = {
            "prompt_length": self.max_prompt_length, "response_length": self.max_new_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": -1, "n": self.n,
            "do_sample": not greedy,
            "val_kwargs": {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "n": 1, "do_sample": False},
        }
        rollout = HFRollout(self._model, self._tokenizer, config)
        dataset = self._dataset(samples, self._tokenizer)
        device = next(self._model.parameters()).device
        texts: List[str] = []
        for start in range(0, len(dataset), self.batch_size):
            items = [dataset[i] for i in range(start, min(start + self.batch_size, len(dataset)))]
            batch = Batch.from_single_dict(collate_fn(items))
            batch.meta_info.update({"validate": greedy, "do_sample": not greedy, "n": self.n,
                                    "temperature": self.temperature, "seed": self.seed + start})
            with torch.no_grad():
                out = rollout.generate_sequences(batch.to(device))
            responses, mask = out.batch["responses"], out.batch["response_mask"]
            for row, m in zip(responses, mask):
                ids = row[m.bool()].tolist()
                texts.append(self._tokenizer.decode(ids, skip_special_tokens=True))
        return texts

    def _generate_vllm(self, samples: Sequence[EvalSample]) -> List[str]:
        from vllm import LLM, SamplingParams

        from deepretrieval.models.tokenizer import load_tokenizer

        if self._llm is None:
            self._tokenizer = load_tokenizer(self.model_dir)
            self._llm = LLM(model=str(self.model_dir), seed=self.seed)
        dataset = self._dataset(samples, self._tokenizer)
        prompts = [dataset.render(row) for row in dataset.rows]
        params = SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p,
                                max_tokens=self.max_new_tokens, seed=self.seed)
        outputs = self._llm.generate(prompts, params)
        return [c.text for o in outputs for c in o.outputs]
