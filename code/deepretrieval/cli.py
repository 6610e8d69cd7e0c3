"""The `deepretrieval` command. Each sub-command lives next to the code it drives and registers
itself through a `register(subparsers)` function in one of `COMMAND_MODULES`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from deepretrieval import __version__

COMMAND_MODULES = [
    "deepretrieval.search.cli",  # index, search
    "deepretrieval.data.cli",  # prepare
    "deepretrieval.eval.cli",  # eval
    "deepretrieval.quickstart_cli",  # quickstart
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepretrieval",
        description="Train LLM query writers with RL on search recall: build indexes, search, "
        "prepare data, evaluate, run the quickstart.",
    )
    parser.add_argument("--version", action="version", version=f"deepretrieval {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
