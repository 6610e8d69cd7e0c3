"""`deepretrieval prepare --task TASK --out DIR`: write a task's train/test/val parquet files.

The same code runs as `python examples/data_preprocess/literature_mining.py`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from deepretrieval.data.prompts import PROMPT_STYLES
from deepretrieval.data.tasks import TASKS, prepare_task

logger = logging.getLogger(__name__)


# the --fold flag of prepare, eval, quickstart and recipe (data.tasks.split_topics)
FOLD_HELP = ("pubmed_mini/trials_sigir: which block of the seeded topic order is tested (0 to 1/test-fraction - 1, "
             "0-3 by default; default 0, the split of the recipe's published runs): the folds test disjoint topics, "
             "so settings chosen on one fold can be checked on another")


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="which search task")
    parser.add_argument("--out", required=True, help="output folder for train/test/val.parquet")
    parser.add_argument(
        "--input",
        default=None,
        help="raw training file instead of the vendored one (pubmed/ctgov: LEADS raw format, e.g. the "
        "publication training split; pubmed_mini/trials_sigir: a topics.jsonl)",
    )
    parser.add_argument("--test-input", default=None, help="pubmed/ctgov: raw test file (LEADS format)")
    parser.add_argument(
        "--style",
        default="reasoning",
        choices=sorted(PROMPT_STYLES),
        help="prompt style: reasoning (prompt opens <think>), reasoning_free, no_reason, compact (the "
        "quickstart's short answer-only prompt; pubmed_mini, trials_sigir), expand (short, the answer adds "
        "terms to the input's words), original (pubmed/ctgov)",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the shuffles and topic split")
    parser.add_argument("--fold", type=int, default=0, help=FOLD_HELP)
    parser.add_argument("--val-size", type=int, default=100, help="rows sampled from test into val.parquet")
    parser.add_argument("--val-from", default="sample", choices=("sample", "first", "train"),
                        help="val.parquet = a seeded sample of test (default); pubmed/ctgov: first = the first "
                        "--val-size test rows in the raw file's original order; pubmed_mini/trials_sigir: train = "
                        "--val-size training topics held out (not trained on)")
    parser.add_argument(
        "--test-fraction", type=float, default=0.25, help="pubmed_mini/trials_sigir: share of test topics"
    )
    parser.add_argument("--max-train", type=int, default=None, help="pubmed/ctgov: keep at most N train rows")
    parser.add_argument("--max-test", type=int, default=None, help="pubmed/ctgov: keep at most N test rows")
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {
        "input": args.input,
        "test_input": args.test_input,
        "style": args.style,
        "seed": args.seed,
        "val_size": args.val_size,
        "test_fraction": args.test_fraction,
        "max_train": args.max_train,
        "max_test": args.max_test,
        "val_from": getattr(args, "val_from", "sample"),
        "fold": args.fold,
    }
    try:
        paths = prepare_task(args.task, args.out, **options)
    except (OSError, ValueError) as exc:
        logger.error("prepare failed: %s", exc)
        return 1
    for split, path in paths.items():
        print(f"{split}\t{path}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="write a search task as verl parquet (train/test/val)",
        description=__doc__,
    )
    add_prepare_arguments(parser)
    parser.set_defaults(func=run_prepare)
