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
resampled, not the two scores apart). A seed and decoding is pooled only when every fold has it (a seed a fold
lacks would mix fewer folds into one row); the others are listed as missing.

Seeds of one fold may come from separate runs (`--seeds 1` on one machine or day, `--seeds 2 3` on another):
runs with the same test topics are one fold, merged first. Their seeds must differ, and the baselines they
both scored must agree on every topic (they are deterministic given the corpus and engine: a difference means
another index or engine setting). Runs of different folds must test disjoint topics; a partial overlap is
refused. All runs must be of one task and metric and, where comparison.json
records them (`settings`, written since run fold3), trained with the same settings, fold aside.

Reads each run folder's `comparison.json` (written by `deepretrieval recipe`, with its `per_topic`
scores); a folder written before `per_topic` existed is refused with the command that rewrites it from the
run's cached records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from deepretrieval.quickstart.recipe import REFERENCE_BASELINES, paired_intervals, policy_seed

COMPARISON_FILE = "comparison.json"
# Two runs of one fold must score a baseline identically (same corpus, engine and queries); float noise aside.
SAME_SCORE_TOL = 1e-9


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


def run_seeds(comp: Mapping[str, Any]) -> List[int]:
    """The seeds a run's comparison scored a policy of."""
    return sorted({seed for seed in map(policy_seed, comp["per_topic"]) if seed is not None})


def _same(a: Any, b: Any) -> bool:
    return a is not None and b is not None and abs(a - b) <= SAME_SCORE_TOL


def merge_fold(comparisons: Sequence[Mapping[str, Any]], names: Sequence[str]) -> Dict[str, Any]:
    """One comparison from runs of the same fold (the same test topics) with different seeds: the policies'
    per-topic scores and chosen steps of every run, the baselines' once (ValueError when a seed is in two runs,
    the folds differ, or a baseline's scores differ)."""
    first = comparisons[0]
    per_topic: Dict[str, Dict[str, float]] = {}
    seed_owner: Dict[int, str] = {}
    base_owner: Dict[str, str] = {}
    steps: Dict[str, Any] = {}
    for name, comp in zip(names, comparisons):
        if comp.get("fold") != first.get("fold"):
            raise ValueError(f"{name} says fold {comp.get('fold')}, {names[0]} fold {first.get('fold')}, with the "
                             "same test topics: the runs disagree on their split")
        for label, scores in comp["per_topic"].items():
            seed = policy_seed(label)
            if seed is not None:
                if seed_owner.setdefault(seed, name) != name:
                    raise ValueError(f"seed {seed} is in both {seed_owner[seed]} and {name}: pool each seed of a fold "
                                     "once")
            elif label in per_topic:  # a baseline an earlier run scored: the same scores, kept once
                bad = [t for t in sorted(set(scores) | set(per_topic[label]))
                       if not _same(scores.get(t), per_topic[label].get(t))]
                if bad:
                    t = bad[0]
                    raise ValueError(f"{label!r} differs between {base_owner[label]} and {name} on {len(bad)} topic(s), "
                                     f"e.g. {t}: {per_topic[label].get(t)} vs {scores.get(t)}; runs of one fold must "
                                     "search the same corpus with the same engine settings")
                continue
            else:
                base_owner[label] = name
            per_topic[label] = dict(scores)
        steps.update(comp.get("trained_steps", {}))
    return dict(first, per_topic=per_topic, trained_steps=steps)


def _check_settings(comparisons: Sequence[Mapping[str, Any]], names: Sequence[str]) -> List[str]:
    """ValueError when two runs record different training settings; returns the runs that record none."""
    recorded = [(name, comp["settings"]) for name, comp in zip(names, comparisons) if comp.get("settings")]
    for name, settings in recorded[1:]:
        ref_name, ref = recorded[0]
        diff = sorted(k for k in set(ref) | set(settings) if ref.get(k) != settings.get(k))
        if diff:
            raise ValueError(f"{name} was trained with other settings than {ref_name} ({', '.join(diff)}): only runs "
                             "of one recipe pool")
    return [name for name, comp in zip(names, comparisons) if not comp.get("settings")]


def group_folds(comparisons: Sequence[Mapping[str, Any]], names: Sequence[str]
                ) -> List[Tuple[str, Dict[str, Any], List[str]]]:
    """(name, merged comparison, its runs) per fold: runs with the same test topics merged (merge_fold), in
    the order of their first run; ValueError when two folds share a topic."""
    groups: Dict[Tuple[str, ...], List[int]] = {}
    for i, comp in enumerate(comparisons):
        groups.setdefault(tuple(sorted(comp["topics"])), []).append(i)
    owner: Dict[str, str] = {}
    folds = []
    for members in groups.values():
        runs = [names[i] for i in members]
        name = " + ".join(runs)
        for topic in comparisons[members[0]]["topics"]:
            if topic in owner:
                raise ValueError(f"topic {topic} is a test topic of both {owner[topic]} and {name}, which test "
                                 "different topic sets: pooled runs are folds of one split (disjoint test topics) "
                                 "or seeds of one fold (the same test topics)")
            owner[topic] = name
        folds.append((name, merge_fold([comparisons[i] for i in members], runs), runs))
    return folds


def _fold_label(name: str, comp: Mapping[str, Any]) -> str:
    return name if comp.get("fold") is None else f"fold {comp['fold']}"


def missing_line(missing_from: Mapping[str, Sequence[str]], seeds_missing_from: Mapping[Any, Sequence[str]]) -> str:
    """What was not pooled and which folds lack it: a seed that some folds have no run of is named once
    ("seed 2 (no run of fold 0)"); any other policy or baseline by itself ("trained, seed 1, greedy-norepeat
    (not in fold 2)")."""
    parts = [f"seed {seed} (no run of {' or '.join(folds)})" for seed, folds in sorted(seeds_missing_from.items())]
    for label, folds in missing_from.items():
        seed = policy_seed(label)
        if seed in seeds_missing_from and list(folds) == list(seeds_missing_from[seed]):
            continue  # absent only where the whole seed is
        parts.append(f"{label} (not in {' or '.join(folds)})")
    return "Not pooled, not in every fold: " + "; ".join(parts) + "."


def pool(comparisons: Sequence[Mapping[str, Any]], names: Sequence[str] = (), n_resamples: int = 2000
         ) -> Dict[str, Any]:
    """The pooled comparison of recipe runs (comparison.json contents; `names` label them in errors and the
    report, default run1, run2, ...): per method the pooled mean with its bootstrap interval, per seed and
    decoding that every fold has the paired intervals against `original`, the best other reference baseline
    (by pooled mean) and the same seed's warm-up (what RL added), and the seeds/decodings some fold lacks."""
    from deepretrieval.eval.metrics import bootstrap_ci

    if not comparisons:
        raise ValueError("no runs to pool")
    names = list(names) or [f"run{i + 1}" for i in range(len(comparisons))]
    task, metric = comparisons[0]["task"], comparisons[0]["metric"]
    for name, comp in zip(names, comparisons):
        if comp["task"] != task or comp["metric"] != metric:
            raise ValueError(f"{name}: task {comp['task']!r}, metric {comp['metric']!r}; the first run has "
                             f"{task!r}, {metric!r}: only runs of one task and metric pool")
    unrecorded = _check_settings(comparisons, names)
    folds = group_folds(comparisons, names)
    merged = [comp for _, comp, _ in folds]
    topics = sorted(t for comp in merged for t in comp["topics"])

    def pooled(label: str) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for comp in merged:
            out.update(comp["per_topic"][label])
        return out

    everywhere = [label for label in merged[0]["per_topic"] if all(label in comp["per_topic"] for comp in merged)]
    missing = sorted({label for comp in merged for label in comp["per_topic"]} - set(everywhere))
    missing_from = {label: [_fold_label(name, comp) for name, comp, _ in folds if label not in comp["per_topic"]]
                    for label in missing}
    seeds = sorted({seed for comp in merged for seed in run_seeds(comp)})
    seeds_missing_from = {seed: lacking for seed in seeds
                          if (lacking := [_fold_label(name, comp) for name, comp, _ in folds
                                          if seed not in run_seeds(comp)])}
    scores = {label: pooled(label) for label in everywhere}
    table = {label: dict(bootstrap_ci([s[t] for t in topics if t in s], n_resamples=n_resamples).to_dict())
             for label, s in scores.items()}
    if REFERENCE_BASELINES[task][0] not in scores:
        raise ValueError(f"{REFERENCE_BASELINES[task][0]!r} is not scored in every run")
    best_other, paired = paired_intervals(scores, {label: row["mean"] for label, row in table.items()}, task, seeds,
                                          topics, n_resamples)
    return {"task": task, "metric": metric,
            "runs": {name: {"fold": comp.get("fold"), "topics": len(comp["topics"]), "seeds": run_seeds(comp),
                            "runs": runs} for name, comp, runs in folds},
            "topics": topics, "table": table, "paired": paired, "best_other": best_other, "missing": missing,
            "missing_from": missing_from, "seeds_missing_from": seeds_missing_from, "settings_unrecorded": unrecorded}


def pool_markdown(result: Mapping[str, Any]) -> str:
    """The pooled comparison as markdown: the runs, the pooled means, the paired intervals."""
    lines = [f"# Pooled recipe runs: {result['task']}, {result['metric']}", "",
             f"{len(result['topics'])} test topics from {len(result['runs'])} fold{'' if len(result['runs']) == 1 else 's'}, "
             "each topic scored by the policy of the fold that tested it (never trained on it):", "", "| runs | fold | test topics | seeds |",
             "|---|---|---|---|"]
    for name, run in result["runs"].items():
        lines.append(f"| {name} | {'' if run['fold'] is None else run['fold']} | {run['topics']} | "
                     f"{', '.join(map(str, run['seeds']))} |")
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
        lines += ["", missing_line(result["missing_from"], result["seeds_missing_from"])]
    if result.get("settings_unrecorded"):
        lines += ["", "Training settings not recorded in comparison.json (written before they were), so not checked "
                      "against the others: " + ", ".join(result["settings_unrecorded"]) + "."]
    return "\n".join(lines) + "\n"


def forest_rows(result: Mapping[str, Any]) -> List[Tuple[str, str, Mapping[str, Any]]]:
    """The pooled paired intervals a forest plot draws, top to bottom: (policy, against, interval) for every
    trained policy against `original` and against its own warm-up (what RL added), where pooled."""
    original = REFERENCE_BASELINES[result["task"]][0]
    return [(label, against, ci) for label, entry in result["paired"].items() for against, ci in entry.items()
            if against == original or policy_seed(against) is not None]  # a policy compared with: its warm-up


def plot_pooled(result: Mapping[str, Any], png: "str | Path") -> Path:
    """A forest plot of the pooled paired differences (forest_rows): per trained policy, trained − `original`
    (circles) and trained − its warm-up (squares) with their 95% intervals, a line at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepretrieval.quickstart.report import save_figure

    rows = forest_rows(result)
    policies = list(dict.fromkeys(label for label, _, _ in rows))
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(policies) + 1.4))
    for label, against, ci in rows:
        y = len(policies) - 1 - policies.index(label)
        vs_original = against == "original"
        y += 0.15 if vs_original else -0.15
        color, marker = ("C0", "o") if vs_original else ("C1", "s")
        ax.plot([ci["low"], ci["high"]], [y, y], color=color, linewidth=1.5)
        ax.plot([ci["mean"]], [y], marker=marker, color=color, markersize=5)
    ax.axvline(0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yticks(range(len(policies)))
    ax.set_yticklabels(list(reversed(policies)), fontsize=8)
    ax.plot([], [], "o-", color="C0", label="trained − original")
    ax.plot([], [], "s-", color="C1", label="trained − its warm-up (what RL added)")
    ax.set_ylim(-0.6, len(policies) - 0.4)
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.set_xlabel(f"paired difference in {result['metric']} (95% bootstrap interval)", fontsize=8)
    fig.suptitle(f"{result['task']}: {len(result['topics'])} held-out topics, {len(result['runs'])} folds pooled",
                 fontsize=9)
    return save_figure(fig, png)


def report_files(out: "str | Path", result: Mapping[str, Any]) -> List[Path]:
    """The files pool_runs writes for `out`: the markdown, its .json, and the forest plot (.png) when anything
    was paired."""
    out = Path(out)
    return [out, out.with_suffix(".json")] + ([out.with_suffix(".png")] if result["paired"] else [])


def pool_runs(run_dirs: Sequence["str | Path"], out: "str | Path | None" = None) -> Dict[str, Any]:
    """Pool recipe run folders; writes `out` (markdown), and next to it the .json and the forest plot
    (report_files), when given."""
    comps: List[Dict[str, Any]] = [load_comparison(d) for d in run_dirs]
    result = pool(comps, names=[str(d) for d in run_dirs])
    if out is not None:
        md, js, *png = report_files(out, result)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(pool_markdown(result))
        js.write_text(json.dumps(result, indent=2) + "\n")
        if png:
            plot_pooled(result, png[0])
    return result
