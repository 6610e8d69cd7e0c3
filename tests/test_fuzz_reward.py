"""Fuzz (hypothesis) of `compute_score` end to end, on a real local index: for any response text,
it never raises, returns a classified result whose error is the model's (never an unexpected
`search_unavailable` or `reward_error`), and is done within a time bound per input.

The default run is derandomized and small (~10 s); `-m slow` runs a larger random campaign."""

import json
import math
import time

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from deepretrieval.rewards.literature import compute_score
from deepretrieval.rewards.parsing import ERROR_CLASSES
from fuzz_helpers import SECONDS_PER_INPUT, fuzz_settings, runs, small_engine

INFO = {"think_in_prompt": False, "prompt_style": "reasoning"}
ALLOWED = set(ERROR_CLASSES) - {"search_unavailable", "reward_error"}

_RESPONSE_PIECES = [
    "<think>", "</think>", "<answer>", "</answer>", "<answer", "{", "}", "[", "]", '"', "'", "\\", "```", "json",
    " ", "\n", "\t", '"query": ', "'query': ", "query", ":", ",", "1", "-", "e", "9" * 50, "null", "true",
    "(", ")", "aspirin", "stroke", "AND", "OR", "NOT", "*", "[tiab]", "\\u0000", "\\ud800", "é", "\u2028",
]
_QUERY_PIECES = [
    "aspirin", "stroke", "warfarin", "random*", "c-reactive", " ", " AND ", " OR ", " NOT ", " AND NOT ", "(", ")",
    '"', "[tiab]", "[ti]", "[mh]", "[majr]", "[dp]", "[au]", "[xx]", "2005", "2001:2005", "/", "#1", "#2", "\n",
    "1.", "adj3", "adj", ".tw.", ".ti,ab.", "exp ", "Aspirin/", "*", "$", "$2", "?", "#", "or/1-2", "and/1,2",
    "limit 1 to humans", "[tiab:~2]", ":", ",", "]", "[", "é", "\u201c", "\ud800",
]


def _repeated(pieces):
    return st.tuples(st.sampled_from(pieces), st.integers(1, 4000)).map(lambda t: t[0] * t[1])


def _text(pieces, max_size=40):
    return st.lists(st.one_of(st.sampled_from(pieces), _repeated(pieces), st.text(max_size=6)),
                    max_size=max_size).map("".join)


QUERIES = _text(_QUERY_PIECES)
RESPONSES = st.one_of(
    _text(_RESPONSE_PIECES),
    QUERIES.map(lambda q: f"<think>x</think><answer>{json.dumps({'query': q})}</answer>"),
    QUERIES.map(lambda q: f"<think>x</think><answer>```json\n{{\"query\": \"{q}\"}}\n```</answer>"),
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return small_engine(tmp_path_factory, "fuzz")


def check_response(engine, text, config=None):
    start = time.process_time()
    result = compute_score("pubmed_mini", text, ["d1", "d3"], INFO, config=config, engine=engine)
    seconds = time.process_time() - start
    assert result["error"] in ALLOWED, (result["error"], result["error_detail"], runs(text))
    assert isinstance(result["score"], float) and math.isfinite(result["score"])
    assert seconds < SECONDS_PER_INPUT, (seconds, runs(text))


_FAST = fuzz_settings(150, derandomize=True)
_LONG = fuzz_settings(3000, derandomize=False)


@_FAST
@given(text=RESPONSES)
def test_fuzz_compute_score(engine, text):
    check_response(engine, text)


@_FAST
@given(text=RESPONSES)
@example(text="<think>x</think>\n<answer>  </answer>")
@example(text='<think>x</think>\n<answer>' + "[" * 5000 + '</answer>')
def test_fuzz_compute_score_strict_json(engine, text):
    # the original's strict reading (json.loads) under the same budgets and invariants
    check_response(engine, text, config={"strict_json": True})


@pytest.mark.slow
@_LONG
@given(text=RESPONSES)
def test_fuzz_compute_score_long(engine, text):
    check_response(engine, text)
