"""What the fit loop does about a failure: which errors a restart can cure, and the one-line
errors that end a run.

- A worker process that died (`WorkerDied`: killed, out of memory, its node lost) or a call that
  ran past its timeout (`WorkerTimeout`) leaves the worker group unusable but says nothing about
  the data or the code: recreating the workers and resuming from the latest complete checkpoint
  can cure it (`trainer.max_restarts`).
- A worker that raised (`WorkerFailed` from an exception in the worker) would raise again on the
  same step: never restarted.
"""

from __future__ import annotations

from deepretrieval.controller.ray_utils import WorkerDied, WorkerTimeout


class RunFailed(RuntimeError):
    """The run cannot go on; the message is one line that says why and what is left on disk."""


def is_restartable(exc: BaseException) -> bool:
    """True for failures that recreating the workers can cure (see the module docstring)."""
    return isinstance(exc, (WorkerDied, WorkerTimeout))


def skipped_steps_error(in_a_row: int, step: int) -> RunFailed:
    """The error that stops a run after `in_a_row` consecutive steps without a single search answer."""
    return RunFailed(f"{in_a_row} steps in a row (up to step {step}) had no sample with a search answer "
                     "(search_unavailable): the search service looks down; stopping instead of training on "
                     "nothing (trainer.max_consecutive_skipped_steps)")
