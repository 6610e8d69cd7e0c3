"""Evaluation samples: the topics of a task's split (or of parquet files) as `EvalSample`s.

    samples = load_samples("trials_sigir", split="test")         # or load_samples(parquet=...)

One sample = one topic: its verl row (prompt, ground truth, extra_info), its relevant ids and
graded judgements, and its topic record (the vendored one, or a topics file's:
deepretrieval.eval.topics) from which the reference baselines read their queries.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from deepretrieval.data.dataset import plain_python
from deepretrieval.eval import baselines


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
    suite: Optional[str] = None  # the topics' name when not the task's own (a --topics file)

    @property
    def data_source(self) -> str:
        return self.task

    @property
    def label(self) -> str:
        """The column of the results (records, table): the suite of topics, else the task."""
        return self.suite or self.task

    @property
    def prompt(self) -> List[Dict[str, str]]:
        return list(self.row.get("prompt") or [])

    @property
    def extra_info(self) -> Dict[str, Any]:
        return dict(self.row.get("extra_info") or {})

    @property
    def ground_truth(self) -> Dict[str, Any]:
        return dict((self.row.get("reward_model") or {}).get("ground_truth") or {})


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
        from deepretrieval.paths import data_root
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


def sample_from_row(
    row: Mapping[str, Any], topic: Optional[Mapping[str, Any]] = None, suite: Optional[str] = None
) -> EvalSample:
    """A verl parquet row -> EvalSample. Its topic record is `topic` when given (a topics file's),
    else the vendored one joined by `extra_info.topic_id`."""
    from deepretrieval.data.dataset import row_extra_info
    from deepretrieval.data.tasks import judgements_from_ground_truth, row_task_input

    row = plain_python(dict(row))
    row["extra_info"] = row_extra_info(row)  # original-format rows: top-level pub_date, original prompt
    task = str(row.get("data_source"))
    extra = row.get("extra_info") or {}
    gt = (row.get("reward_model") or {}).get("ground_truth") or {}
    topic_id = str(extra.get("topic_id", extra.get("index", "")))
    need = row_task_input(row)
    sample = EvalSample(
        task=task,
        topic_id=topic_id,
        row=row,
        relevant=[str(t) for t in (gt.get("target") or [])],
        judgements=judgements_from_ground_truth(gt) if gt.get("judged") is not None else None,
        need_text=need,
        pico=parse_pico(need) if task in ("pubmed", "ctgov") else None,
        topic=dict(topic) if topic is not None else vendored_topics(task).get(topic_id),
        suite=suite,
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
