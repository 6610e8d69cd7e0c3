#!/usr/bin/env python
"""Plot training reward and training / test recall@100 per step from the trainer's JSONL metrics.

    python scripts/plot_reward_curve.py outputs/quickstart/logs/metrics.jsonl images/reward_curve.png
"""

import argparse
import sys

from deepretrieval.quickstart.report import plot_reward_curve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="metrics.jsonl written by trainer.logger=[...,jsonl]")
    p.add_argument("out", nargs="?", default="images/reward_curve.png", help="PNG to write")
    p.add_argument("--title", default="", help="figure title")
    args = p.parse_args(argv)
    print(plot_reward_curve(args.metrics, args.out, title=args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
