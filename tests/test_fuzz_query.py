"""Fuzz (hypothesis) of the query parser and the local engine: for any string, `parse` returns a
tree within the depth budget or raises `QuerySyntaxError`; the tree renders; the local engine
returns a result or raises `QuerySyntaxError` (never RecursionError, ValueError or anything else),
each within a time bound per input.

The default run is derandomized and small (~10 s); `-m slow` runs a larger random campaign."""

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepretrieval.search import query as Q
from deepretrieval.search.base import QuerySyntaxError
from test_fuzz_reward import QUERIES  # the same query alphabet as the reward fuzz
from fuzz_helpers import SECONDS_PER_INPUT, fuzz_settings, runs, small_engine


def _nested(parts):
    """Deep structures around the depth budget: parentheses, NOT chains, alternating operators,
    adjN chains and line-reference chains."""
    kind, n, m = parts
    if kind == "parens":
        return "(" * n + "aspirin" + " OR stroke" * m + ")" * n
    if kind == "not":
        return "aspirin" + " NOT stroke" * n + " OR warfarin" * m
    if kind == "alternating":
        return "aspirin" + " AND stroke OR warfarin" * n + ")" * m
    if kind == "adj":
        return "(" + " adj2 ".join(["aspirin"] * (n % 60 + 1)) + ").tw." + " or stroke" * m
    return "\n".join(["aspirin"] + [f"#{i} NOT x{i}" for i in range(1, n + 1)] + ["#1 OR #2"] * (m % 3))


DEEP = st.tuples(st.sampled_from(["parens", "not", "alternating", "adj", "lines"]),
                 st.integers(0, 400), st.integers(0, 5)).map(_nested)
ANY_QUERY = st.one_of(QUERIES, DEEP, st.text(max_size=200))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return small_engine(tmp_path_factory, "fuzz_query")


def check_query(engine, query):
    start = time.process_time()
    try:
        parsed = Q.parse(query)
    except QuerySyntaxError as exc:
        assert exc.position is None or 0 <= exc.position <= len(query)
        parsed = None
    if parsed is not None:
        depths = {}
        for n, node in parsed.lines.items():
            depths[n] = Q.expanded_depth(node, depths)
            assert depths[n] <= Q.MAX_QUERY_DEPTH
        assert parsed.root.depth <= Q.expanded_depth(parsed.root, depths) <= Q.MAX_QUERY_DEPTH
        assert isinstance(str(parsed), str)
        Q.referenced_lines(parsed)
    try:
        res = engine.search(query, k=10)
        assert parsed is not None, "the engine accepted a query the parser rejects"
        assert 0 <= len(res.ids) <= 10 and res.total is None  # not counted: the reward path's search
    except QuerySyntaxError:
        pass
    seconds = time.process_time() - start
    assert seconds < SECONDS_PER_INPUT, (seconds, runs(query))


_FAST = fuzz_settings(200, derandomize=True)
_LONG = fuzz_settings(3000, derandomize=False)


@_FAST
@given(query=ANY_QUERY)
def test_fuzz_query_parser_and_local_engine(engine, query):
    check_query(engine, query)


@pytest.mark.slow
@_LONG
@given(query=ANY_QUERY)
def test_fuzz_query_parser_and_local_engine_long(engine, query):
    check_query(engine, query)
