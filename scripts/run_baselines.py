#!/usr/bin/env python
"""Reproduce the reference-baseline table of docs/evaluation.md on the vendored data.

    python scripts/run_baselines.py [--out outputs/eval/baselines] [--split all] [--image images/eval_baselines.png]

Runs `deepretrieval eval --task pubmed_mini --task trials_sigir --split SPLIT --baseline all`
(local indexes are built on first use), prints the Markdown table and, with --image, copies the
plot there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/eval/baselines")
    parser.add_argument("--split", default="all", choices=["all", "test", "train"])
    parser.add_argument("--image", default=None, help="copy the plot here (e.g. images/eval_baselines.png)")
    args = parser.parse_args()

    from deepretrieval.cli import main as cli_main

    start = time.perf_counter()
    code = cli_main(["eval", "--task", "pubmed_mini", "--task", "trials_sigir", "--split", args.split,
                     "--baseline", "all", "--out", args.out])
    print(f"wall time: {time.perf_counter() - start:.1f}s")
    if code == 0 and args.image:
        Path(args.image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(args.out) / "recall.png", args.image)
    return code


if __name__ == "__main__":
    sys.exit(main())
