"""The `deepretrieval` command. Each sub-command lives next to the code it drives and registers
itself through a `register(subparsers)` function in one of `COMMAND_MODULES`.

Guarantees that hold for every sub-command (docs/reliability.md):

- No traceback for any error: a failure is one `error: ...` line on stderr and a nonzero exit
  code (the sub-command's own codes; 70 for an unexpected internal error, whose traceback is
  logged with `-v`; 130 on Ctrl-C).
- A closed output pipe (`deepretrieval search ... | head`) ends the command quietly with exit
  code 141 (128 + SIGPIPE, what a shell reports for a Unix tool killed by SIGPIPE).
- Start-up imports only what the parser needs: the command modules keep their heavy imports
  (torch, transformers, ray, pandas) inside the functions that use them, so `search` and
  `index` never load them (tests/test_cli_pipe_and_startup.py checks it).

`deepretrieval train key=value ...` is the PPO/GRPO trainer, the same entry as
`python -m deepretrieval.trainer.main_ppo key=value ...` (kept for verl users): the arguments
are Hydra overrides passed through unchanged, and the trainer is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, List, Optional

from deepretrieval import __version__

logger = logging.getLogger(__name__)

COMMAND_MODULES = [
    "deepretrieval.search.cli",  # index, search
    "deepretrieval.data.cli",  # prepare
    "deepretrieval.eval.cli",  # eval
    "deepretrieval.quickstart.cli",  # quickstart
]

EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug, not the user's input
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_PIPE = 141  # 128 + SIGPIPE
MAX_ERROR_CHARS = 500  # an error line quotes at most this much of a message


class OutputClosed(BaseException):
    """The reader of stdout or stderr went away. A BaseException, so that no `except Exception`
    in a sub-command turns it into an error message that nobody can read."""


class _GuardedStream:
    """stdout/stderr wrapper that turns BrokenPipeError into `OutputClosed` and remembers it."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.broken = False

    def _guard(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            self.broken = True
            raise OutputClosed() from None

    def write(self, text: str) -> int:
        return self._guard("write", text)

    def writelines(self, lines: Any) -> None:
        self._guard("writelines", lines)

    def flush(self) -> None:
        self._guard("flush")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def one_line(message: Any, limit: int = MAX_ERROR_CHARS) -> str:
    """A message as one line of at most `limit` characters (newlines folded, the rest cut)."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_line(message: Any) -> None:
    """Print `error: <message>` as one line on stderr."""
    print(f"error: {one_line(message)}", file=sys.stderr)


TRAIN_USAGE = """usage: deepretrieval train [--cfg] [key=value ...]

Train a query writer with PPO / GRPO. The arguments are Hydra overrides of the trainer's
configuration, exactly as for `python -m deepretrieval.trainer.main_ppo`; e.g.
  deepretrieval train data.train_files=train.parquet actor_rollout_ref.model.path=Qwen/Qwen2.5-0.5B-Instruct
--cfg prints the composed configuration and exits. The trainer's own help follows.
"""


def register_train(subparsers: Any) -> None:
    """`deepretrieval train key=value ...`: every argument goes to the trainer (see `run_train`)."""
    sub = subparsers.add_parser(
        "train", add_help=False, usage="deepretrieval train [--cfg] [key=value ...]",
        help="train a query writer with PPO/GRPO (Hydra key=value overrides; `train --help` explains)")
    sub.add_argument("overrides", nargs=argparse.REMAINDER)
    sub.set_defaults(func=run_train, pass_unknown_args=True)


def run_train(args: argparse.Namespace) -> int:
    """Run the trainer's entry point (`trainer/main_ppo.py:main`) on the overrides; its exit code:
    0 success, 2 configuration error (one line on stderr), 1 run failure, 130 interrupted."""
    if any(a in ("-h", "--help") for a in args.overrides):
        print(TRAIN_USAGE)
    from deepretrieval.trainer.main_ppo import main as train_main

    return train_main(list(args.overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepretrieval",
        description="Train LLM query writers with RL on search recall: build indexes, search, "
        "prepare data, train, evaluate, run the quickstart.",
    )
    parser.add_argument("--version", action="version", version=f"deepretrieval {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks of internal errors)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    register_train(subparsers)
    return parser


def _run(argv: Optional[List[str]]) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # options of the trainer (`train --cfg`) belong to it; elsewhere they are errors
        if not getattr(args, "pass_unknown_args", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = unknown + list(args.overrides)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        error_line("interrupted")
        return EXIT_INTERRUPTED
    except (OutputClosed, SystemExit, GeneratorExit):
        raise
    except MemoryError:
        error_line("out of memory")
        return 1
    except OSError as exc:  # the environment (a missing file, a full disk, no permission), not a bug
        error_line(exc)
        return 1
    except BaseException as exc:  # noqa: BLE001 - last resort; also pyo3's PanicException (a BaseException)
        logger.debug("internal error", exc_info=True)
        hint = "" if args.verbose else " (rerun with -v for the traceback)"
        error_line(f"internal error: {type(exc).__name__}: {one_line(exc, 300)}{hint}")
        return EXIT_INTERNAL


def _discard(stream: Any) -> None:
    """Point a broken stream's file descriptor at /dev/null, so that the interpreter's flush at
    exit does not report the broken pipe again (the Python documentation's recipe)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. captured by a test)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns its exit code (argparse's --help/usage errors raise SystemExit)."""
    saved = sys.stdout, sys.stderr
    guards = _GuardedStream(saved[0]), _GuardedStream(saved[1])
    sys.stdout, sys.stderr = guards
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # still guarded: a pipe closed by now is reported here
    except OutputClosed:
        for guard, stream in zip(guards, saved):
            if guard.broken:
                _discard(stream)
        return EXIT_PIPE
    finally:
        sys.stdout, sys.stderr = saved


if __name__ == "__main__":
    sys.exit(main())
