"""Summaries of evaluation records: per (task, method) means with bootstrap intervals, error counts,
a Markdown table (method × task, like the DeepRetrieval paper's recall table) and a bar plot.

Per topic, the n queries of a method are collapsed first (`mean`: expected score of one query;
`best`: best-of-n), then topics are averaged and the 95% interval is a percentile bootstrap over
topics (deepretrieval.eval.metrics.bootstrap_ci). Queries that failed for infrastructure reasons
(runner.INFRA_ERRORS) are left out; topics where the method does not apply are not counted.

Parse failures (runner.WRITER_ERRORS: format, json, empty_query, query_syntax) count as recall 0
in the main mean. The original DeepRetrieval evaluation (src/eval/eval_literature.py) left them
out of its mean recall instead, so every metric is also reported as `<metric>/parsed_only` (mean
over the queries that were searched; topics without one are left out), and the table shows both
where they differ, saying which is which.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from deepretrieval.eval.metrics import aggregate_samples, bootstrap_ci
from deepretrieval.eval.runner import INFRA_ERRORS, WRITER_ERRORS


def _metric_names(records: Sequence[Mapping[str, Any]]) -> List[str]:
    names = set()
    for r in records:
        names.update((r.get("metrics") or {}).keys())

    def order(name: str) -> tuple:
        kind, _, cut = name.partition("@")
        return ({"recall": 0, "precision": 1, "ndcg": 2}.get(kind, 3), int(cut) if cut.isdigit() else 0)

    return sorted(names, key=order)


def summarize_group(
    records: Sequence[Mapping[str, Any]],
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Dict[str, Any]:
    """Summary of one (task, method): per-metric intervals (mean over samples, and best-of-n)."""
    errors = Counter(str(r.get("error", "none")) for r in records)
    scored = [r for r in records if r.get("error") not in INFRA_ERRORS and r.get("error") != "not_applicable"]
    by_topic: Dict[str, List[Mapping[str, Any]]] = defaultdict(list)
    for r in scored:
        by_topic[str(r["topic_id"])].append(r)
    n_per_topic = max((len(v) for v in by_topic.values()), default=0)
    summary: Dict[str, Any] = {
        "task": records[0].get("task") if records else None,
        "method": records[0].get("method") if records else None,
        "k": records[0].get("k") if records else None,
        "n_topics": len(by_topic),
        "n_queries": len(scored),
        "n_not_applicable_topics": len({r["topic_id"] for r in records if r.get("error") == "not_applicable"}),
        "n_excluded_queries": sum(1 for r in records if r.get("error") in INFRA_ERRORS),
        "errors": dict(sorted(errors.items())),
        "error_rate": (sum(c for e, c in errors.items() if e not in ("none", "not_applicable")) / len(records))
        if records else 0.0,
        "metrics": {},
    }
    hows = ["mean", "best"] if n_per_topic > 1 else ["mean"]
    parsed_by_topic = {t: [r for r in rs if r.get("error") not in WRITER_ERRORS] for t, rs in by_topic.items()}
    summary["n_parse_failures"] = sum(1 for r in scored if r.get("error") in WRITER_ERRORS)
    for name in _metric_names(scored):
        for how in hows:
            per_topic = [aggregate_samples([(r.get("metrics") or {}).get(name) for r in rs], how)
                         for rs in by_topic.values()]
            ci = bootstrap_ci([v for v in per_topic if v is not None], confidence, n_resamples, seed)
            key = name if how == "mean" else f"{name}/best_of_{n_per_topic}"
            summary["metrics"][key] = ci.to_dict()
        # the original's mean: parse failures left out, not counted as 0
        per_topic = [aggregate_samples([(r.get("metrics") or {}).get(name) for r in rs], "mean")
                     for rs in parsed_by_topic.values() if rs]
        ci = bootstrap_ci([v for v in per_topic if v is not None], confidence, n_resamples, seed)
        summary["metrics"][f"{name}/parsed_only"] = ci.to_dict()
    return summary


def summarize(records: Iterable[Mapping[str, Any]], **kwargs: Any) -> List[Dict[str, Any]]:
    """One summary per (task, method), in first-seen order."""
    groups: Dict[tuple, List[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r.get("task"), r.get("method")), []).append(r)
    return [summarize_group(rs, **kwargs) for rs in groups.values()]


def _fmt(cell: Optional[Mapping[str, Any]], digits: int) -> str:
    if not cell or cell.get("n", 0) == 0 or cell.get("mean") is None or math.isnan(cell["mean"]):
        return "–"
    return f"{cell['mean']:.{digits}f} [{cell['low']:.{digits}f}, {cell['high']:.{digits}f}]"


def main_metric(summary: Mapping[str, Any]) -> str:
    return f"recall@{summary.get('k')}"


def markdown_table(summaries: Sequence[Mapping[str, Any]], metric: Optional[str] = None, digits: int = 3) -> str:
    """Method × task table of `metric` (default: each task's recall@K) as `mean [low, high]`,
    with the topic count per column and a footnote on excluded queries."""
    tasks: List[str] = []
    methods: List[str] = []
    cells: Dict[tuple, Mapping[str, Any]] = {}
    for s in summaries:
        if s["task"] not in tasks:
            tasks.append(s["task"])
        if s["method"] not in methods:
            methods.append(s["method"])
        cells[(s["method"], s["task"])] = s
        # a method with several queries per topic also gets a best-of-n row
        best = [k for k in s["metrics"] if k.startswith(main_metric(s) + "/best_of_")]
        if best and metric is None:
            label = f"{s['method']} ({best[0].rsplit('/', 1)[1].replace('_', '-')})"
            if label not in methods:
                methods.append(label)
            cells[(label, s["task"])] = dict(s, metrics={main_metric(s): s["metrics"][best[0]]}, errors={})
    headers = []
    for t in tasks:
        ks = {str(s["k"]) for s in summaries if s["task"] == t}
        name = metric or f"recall@{'/'.join(sorted(ks))}"
        headers.append(f"{t} {name}")
    lines = ["| method | " + " | ".join(headers) + " |", "|---|" + "---|" * len(tasks)]
    notes = []
    any_parsed_only = False
    for m in methods:
        row = [m]
        for t in tasks:
            s = cells.get((m, t))
            if s is None:
                row.append("")
                continue
            name = metric or main_metric(s)
            cell = s["metrics"].get(name)
            text = _fmt(cell, digits)
            if cell and cell.get("n"):
                text += f" (n={cell['n']})"
            parsed = s["metrics"].get(f"{name}/parsed_only")
            if s.get("n_parse_failures") and parsed and parsed.get("n"):
                text += f"; parsed only {_fmt(parsed, digits)} (n={parsed['n']})"
                any_parsed_only = True
            row.append(text)
            bad = {e: c for e, c in s["errors"].items() if e not in ("none", "not_applicable")}
            if bad:
                notes.append(f"{m} / {t}: " + ", ".join(f"{e} {c}" for e, c in sorted(bad.items())))
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    text += "\nMean over topics with a 95% percentile-bootstrap interval; n = topics.\n"
    if any_parsed_only:
        text += ("First value: responses without a usable query (format/json/empty_query/query_syntax) count as "
                 "recall 0. \"parsed only\": they are left out, as the original DeepRetrieval evaluation did "
                 "(compare this one with the paper's numbers).\n")
    if notes:
        text += "\nQuery errors (format/json/empty_query/query_syntax score 0; search/LLM failures are left out):\n"
        text += "".join(f"- {n}\n" for n in notes)
    return text


def write_report(
    summaries: Sequence[Mapping[str, Any]], out_dir: "str | os.PathLike[str]", plot: bool = True
) -> Dict[str, Path]:
    """summary.json, table.md and (matplotlib permitting) recall.png under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "table": out / "table.md"}
    paths["summary"].write_text(json.dumps(list(summaries), indent=2) + "\n")
    paths["table"].write_text(markdown_table(summaries))
    if plot and summaries:
        paths["plot"] = plot_summaries(summaries, out / "recall.png")
    return paths


def plot_summaries(summaries: Sequence[Mapping[str, Any]], path: "str | os.PathLike[str]") -> Path:
    """Grouped bars: one group per task, one bar per method, 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(dict.fromkeys(s["task"] for s in summaries))
    methods = list(dict.fromkeys(s["method"] for s in summaries))
    cells = {(s["method"], s["task"]): s for s in summaries}
    present = {t: [m for m in methods if (m, t) in cells and cells[(m, t)]["metrics"].get(main_metric(cells[(m, t)]), {}).get("n")]
               for t in tasks}
    width = 0.8 / max(1, max((len(v) for v in present.values()), default=1))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * sum(len(v) for v in present.values()) + 2), 3.6))
    x = np.arange(len(tasks))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labelled = set()
    for i, t in enumerate(tasks):
        for j, m in enumerate(present[t]):  # only the methods that apply, centred on the task
            s = cells[(m, t)]
            cell = s["metrics"][main_metric(s)]
            pos = x[i] + (j - (len(present[t]) - 1) / 2) * width
            ax.bar(pos, cell["mean"], width, yerr=[[cell["mean"] - cell["low"]], [cell["high"] - cell["mean"]]],
                   capsize=3, color=colors[methods.index(m) % len(colors)],
                   label=None if m in labelled else m)
            labelled.add(m)
    ax.set_xticks(x)
    k_of = {s["task"]: s.get("k") for s in summaries}
    ax.set_xticklabels([f"{t}\n(recall@{k_of[t]})" for t in tasks])
    ax.set_ylabel("recall (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
