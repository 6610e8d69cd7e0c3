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
  `index` never load them (tests/test_cli_startup.py checks it).
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
    "deepretrieval.quickstart_cli",  # quickstart
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepretrieval",
        description="Train LLM query writers with RL on search recall: build indexes, search, "
        "prepare data, evaluate, run the quickstart.",
    )
    parser.add_argument("--version", action="version", version=f"deepretrieval {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks of internal errors)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _run(argv: Optional[List[str]]) -> int:
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
