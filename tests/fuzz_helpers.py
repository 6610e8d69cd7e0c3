"""Shared pieces of the fuzz tests (test_fuzz_reward.py, test_fuzz_query.py): the per-input CPU
budget, hypothesis settings, a small local index, and a readable summary of a failing input."""

from pathlib import Path

from hypothesis import HealthCheck, settings

from deepretrieval.search.local import LocalSearchEngine
from deepretrieval.search.local_index import build_index

SECONDS_PER_INPUT = 3.0  # CPU seconds (not wall-clock: the machine is shared); inputs take milliseconds
SMALL = Path(__file__).parent / "fixtures" / "search" / "small_corpus.jsonl"
_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


def fuzz_settings(max_examples: int, derandomize: bool) -> settings:
    """Default-suite runs are derandomized (a failure reproduces); the slow runs draw fresh inputs."""
    return settings(max_examples=max_examples, deadline=None, derandomize=derandomize, suppress_health_check=_HEALTH)


def small_engine(tmp_path_factory, name: str) -> LocalSearchEngine:
    out = tmp_path_factory.mktemp(name) / "idx"
    build_index(SMALL, out, progress=False)
    return LocalSearchEngine(out)


def runs(text, limit=40):
    """A run-length summary of `text` for failure messages: ([(piece, repeats), ...], length),
    each piece (1-8 characters) chosen to cover the longest stretch from where it starts."""
    out, i = [], 0
    while i < len(text) and len(out) < limit:
        best = (1, 1)
        for period in range(1, 9):
            piece, reps = text[i:i + period], 1
            while text.startswith(piece, i + reps * period):
                reps += 1
            if len(piece) == period and period * reps > best[0] * best[1]:
                best = (period, reps)
        out.append((text[i:i + best[0]], best[1]))
        i += best[0] * best[1]
    return out, len(text)
