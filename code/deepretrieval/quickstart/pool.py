"""Pooling the recipe's folds: one cross-validated comparison over the test topics of several folds.

`deepretrieval recipe --fold F` trains on three quarters of a task's topics and tests on the fourth
(data.tasks.split_topics; the folds' test topics are disjoint). A fold's policies are scored only on topics
they never trained on, so the runs of several folds together score every topic of those folds with a
policy that did not see it: with 12 patients per fold a seed's paired interval is wide, with 36 or 48 it
narrows. For seed s and decoding d, the pooled scores are the per-topic scores of "trained, seed s, d" of
every fold, each fold's topics scored by its own seed-s policy:

    pooled(s, d)     = concat over folds F of {t: score_F(trained, seed s, d)[t] : t in test topics of F}
    pooled(baseline) = concat over folds F of {t: score_F(baseline)[t]}
    difference       = mean over pooled topics t of pooled(s, d)[t] - pooled(original)[t]

with the paired bootstrap interval over the pooled topics (eval.metrics.paired_bootstrap_ci: topics are
resampled, not the two scores apart). A seed and decoding is pooled only when every run has it (a seed a fold
lacks would mix fewer folds into one row); the others are listed as missing. The runs must be of one task
and metric, and no topic may be in two runs (the same fold twice, or two splits that overlap).

Reads each run folder's `comparison.json` (written by `deepretrieval recipe`, with its `per_topic`
scores); a folder written before `per_topic` existed is refused with the command that rewrites it from the
run's cached records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from deepretrieval.quickstart.recipe import REFERENCE_BASELINES, paired_intervals

COMPARISON_FILE = "comparison.json"


def load_comparison(run_dir: "str | Path") -> Dict[str, Any]:
    """A recipe run's comparison.json; ValueError when it is missing or lacks the per-topic scores."""
    path = Path(run_dir) / COMPARISON_FILE
    if not path.is_file():
        raise ValueError(f"{path}: not found (a `deepretrieval recipe` run folder has it after its final evaluation)")
    try:
        comp = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(comp, dict) or not isinstance(comp.get("per_topic"), dict) or not comp.get("task"):
        raise ValueError(f"{path}: no per-topic scores (written before they were kept); rerun the recipe's command "
                         "on this folder: finished stages and cached evaluation records are reused, so it only "
                         "rewrites comparison.json and results.md")
    return comp


def pool(comparisons: Sequence[Mapping[str, Any]], names: Sequence[str] = (), n_resamples: int = 2000
         ) -> Dict[str, Any]:
    """The pooled comparison of recipe runs (comparison.json contents; `names` label them in errors and the
    report, default run1, run2, ...): per method the pooled mean with its bootstrap interval, per seed and
    decoding that every run has the paired intervals against `original` and against the best other reference
    baseline (by pooled mean), and the seeds/decodings some run lacks."""
    from deepretrieval.eval.metrics import bootstrap_ci

    if not comparisons:
        raise ValueError("no runs to pool")
    names = list(names) or [f"run{i + 1}" for i in range(len(comparisons))]
    task, metric = comparisons[0]["task"], comparisons[0]["metric"]
    for name, comp in zip(names, comparisons):
        if comp["task"] != task or comp["metric"] != metric:
            raise ValueError(f"{name}: task {comp['task']!r}, metric {comp['metric']!r}; the first run has "
                             f"{task!r}, {metric!r}: only runs of one task and metric pool")
    owner: Dict[str, str] = {}
    for name, comp in zip(names, comparisons):
        for topic in comp["topics"]:
            if topic in owner:
                raise ValueError(f"topic {topic} is a test topic of both {owner[topic]} and {name}: pooled runs "
                                 "must test disjoint topics (different folds of one split)")
            owner[topic] = name
    topics = sorted(owner)

    def pooled(label: str) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for comp in comparisons:
            out.update(comp["per_topic"][label])
        return out

    everywhere = [label for label in comparisons[0]["per_topic"]
                  if all(label in comp["per_topic"] for comp in comparisons)]
    missing = sorted({label for comp in comparisons for label in comp["per_topic"]} - set(everywhere))
    scores = {label: pooled(label) for label in everywhere}
    table = {label: dict(bootstrap_ci([s[t] for t in topics if t in s], n_resamples=n_resamples).to_dict())
             for label, s in scores.items()}
    if REFERENCE_BASELINES[task][0] not in scores:
        raise ValueError(f"{REFERENCE_BASELINES[task][0]!r} is not scored in every run")
    seeds = sorted({int(s) for comp in comparisons for s in comp.get("trained_steps", {})})
    best_other, paired = paired_intervals(scores, {label: row["mean"] for label, row in table.items()}, task, seeds,
                                          topics, n_resamples)
    return {"task": task, "metric": metric, "runs": {name: {"fold": comp.get("fold"), "topics": len(comp["topics"])}
                                                     for name, comp in zip(names, comparisons)},
            "topics": topics, "table": table, "paired": paired, "best_other": best_other, "missing": missing}


def pool_markdown(result: Mapping[str, Any]) -> str:
    """The pooled comparison as markdown: the runs, the pooled means, the paired intervals."""
    lines = [f"# Pooled recipe runs: {result['task']}, {result['metric']}", "",
             f"{len(result['topics'])} test topics from {len(result['runs'])} runs, each topic scored by the policy "
             "of the run that tested it (never trained on it):", "", "| run | fold | test topics |", "|---|---|---|"]
    for name, run in result["runs"].items():
        lines.append(f"| {name} | {'' if run['fold'] is None else run['fold']} | {run['topics']} |")
    lines += ["", f"| method | pooled {result['metric']} [95% CI] | topics |", "|---|---|---|"]
    for label, ci in result["table"].items():
        lines.append(f"| {label} | {ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] | {ci['n']} |")
    lines += ["", "Paired bootstrap over the pooled topics (trained − baseline; 95% interval; topics won / lost):", "",
              "| policy | against | difference [95% CI] | won / lost |", "|---|---|---|---|"]
    for label, entry in result["paired"].items():
        for against, ci in entry.items():
            lines.append(f"| {label} | {against} | {ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}] | "
                         f"{ci['wins']} / {ci['losses']} |")
    if result["missing"]:
        lines += ["", "Not pooled (not in every run): " + ", ".join(result["missing"]) + "."]
    return "\n".join(lines) + "\n"


def pool_runs(run_dirs: Sequence["str | Path"], out: "str | Path | None" = None) -> Dict[str, Any]:
    """Pool recipe run folders; writes `out` (markdown) and `out` with .json when given."""
    comps: List[Dict[str, Any]] = [load_comparison(d) for d in run_dirs]
    result = pool(comps, names=[str(d) for d in run_dirs])
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(pool_markdown(result))
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return result
