"""Reward path hardening (issue #19): answers that used to raise or to take super-linear time are
classified promptly; the length budgets are themselves classified errors; the linear rewrites of
the answer-block and code-fence regexes give exactly what the regexes gave."""

import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepretrieval.rewards import parsing
from deepretrieval.rewards.literature import compute_score
from deepretrieval.rewards.parsing import (
    ERROR_CLASSES,
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    MAX_RESPONSE_CHARS,
    extract_answer_block,
    parse_answer,
)
from deepretrieval.search.base import SearchEngine, SearchResult
from deepretrieval.search.query import MAX_QUERY_CHARS

# Generous: every input below is classified in milliseconds; before the fix the same inputs took
# from tens of seconds (quadratic) to hours (cubic), or raised.
SECONDS_PER_INPUT = 3.0


class RecordingEngine(SearchEngine):
    name = "recording"

    def __init__(self):
        self.calls = []

    def search(self, query, k=100, **filters):
        self.calls.append(query)
        return SearchResult(ids=["1"], total=1, query=query, engine=self.name, k=k)


def timed(fn, *args):
    start = time.process_time()
    value = fn(*args)
    return value, time.process_time() - start


def wrap(answer_body: str) -> str:
    return f"<think>x</think><answer>{answer_body}</answer>"


# ---------------------------------------------------------------- values that used to raise


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 1_000, 12_000])
@pytest.mark.parametrize("opener,closer", [("[", "]"), ('{"a": ', "}")])
def test_deeply_nested_json_is_a_json_error(levels, opener, closer):
    body = '{"query": "aspirin", "x": ' + opener * levels + "1" + closer * levels + "}"
    parsed, seconds = timed(parse_answer, wrap(body))
    assert parsed.error == "json" and parsed.query is None
    assert f"nested deeper than {MAX_JSON_DEPTH}" in parsed.detail
    assert seconds < SECONDS_PER_INPUT


def test_json_nested_to_the_limit_is_read():
    # the object itself is level 1, so MAX_JSON_DEPTH - 1 brackets inside it reach the limit exactly
    inner = MAX_JSON_DEPTH - 1
    body = '{"query": "aspirin", "x": ' + "[" * inner + "]" * inner + "}"
    assert parse_answer(wrap(body)).query == "aspirin"
    # brackets inside strings do not count
    assert parse_answer(wrap('{"query": "' + "[" * 5000 + '"}')).query == "[" * 5000


@pytest.mark.parametrize("digits", [MAX_INT_DIGITS + 1, 5_000, 90_000])
def test_long_json_integers_do_not_raise(digits):
    body = '{"query": "aspirin", "n": ' + "7" * digits + "}"
    parsed, seconds = timed(parse_answer, wrap(body))
    assert parsed.error == "none" and parsed.query == "aspirin"
    assert seconds < SECONDS_PER_INPUT
    # in the Python-literal fallback (single quotes) the same integer is an error, not an exception
    parsed = parse_answer(wrap("{'query': 'aspirin', 'n': " + "7" * digits + "}"))
    assert parsed.error in ("none", "json")


def test_integers_up_to_the_limit_stay_exact():
    value = int("9" * MAX_INT_DIGITS)
    decoded, _ = parsing._decode_object('{"query": "a", "n": ' + str(value) + "}")
    assert decoded["n"] == value
    decoded, _ = parsing._decode_object('{"query": "a", "n": ' + "9" * (MAX_INT_DIGITS + 1) + "}")
    assert decoded["n"] == float("inf")


# ---------------------------------------------------------------- super-linear inputs


def _fence_whitespace(n):
    return "<answer>```" + " " * n + "x</answer>"


def _fence_whitespace_closed(n):
    return "<answer>```json" + " " * n + "\n" + " " * n + '{"query": "a"}' + " " * n + "```</answer>"


def _unclosed_tags(n):
    return "<answer>" * (n // len("<answer>"))


def _unclosed_then_closed(n):
    return "<answer>" * (n // len("<answer>") - 4) + '{"query": "a"}</answer>'


def _open_braces(n):
    return "<answer>" + "{" * n + "</answer>"


def _quotes_and_backslashes(n):
    return '<answer>{"query": "' + '\\"' * (n // 2) + "</answer>"


def _single_quotes(n):
    return "<answer>{'query': " + "'a', " * (n // 5) + "}</answer>"


def _alternating_tags(n):
    return "<think></think><answer></answer>" * (n // 32)


ADVERSARIAL = [
    _fence_whitespace,
    _fence_whitespace_closed,
    _unclosed_tags,
    _unclosed_then_closed,
    _open_braces,
    _quotes_and_backslashes,
    _single_quotes,
    _alternating_tags,
]


@pytest.mark.parametrize("make", ADVERSARIAL, ids=lambda f: f.__name__)
def test_adversarial_answers_at_the_length_budget_are_classified_promptly(make):
    text = make(MAX_RESPONSE_CHARS // 3)
    text = text[:MAX_RESPONSE_CHARS] if len(text) > MAX_RESPONSE_CHARS else text
    result, seconds = timed(compute_score, "pubmed_mini", text, ["1"], None, None, RecordingEngine())
    assert result["error"] in ERROR_CLASSES
    assert seconds < SECONDS_PER_INPUT, f"{make.__name__}: {seconds:.2f}s"


def test_quoted_examples_from_the_issue():
    """The inputs measured in issue #19 (4.3 s, 19.8 s): now milliseconds, same classes as before."""
    parsed, seconds = timed(parse_answer, "<answer>```" + " " * 2000 + "x</answer>")
    assert parsed.error == "json" and seconds < SECONDS_PER_INPUT
    # 20k tags are 160k characters, over the response budget; the block search itself is linear too
    parsed, seconds = timed(parse_answer, "<answer>" * 20_000)
    assert parsed.error == "too_long" and seconds < SECONDS_PER_INPUT
    block, seconds = timed(extract_answer_block, "<answer>" * 20_000)
    assert block is None and seconds < SECONDS_PER_INPUT
    block, seconds = timed(extract_answer_block, "<answer>" * 200_000 + "q</answer>")
    assert block == "<answer>" * 199_999 + "q" and seconds < SECONDS_PER_INPUT
    parsed = parse_answer("<answer>```json" + " " * 2000 + '\n{"query": "a"}\n' + " " * 2000 + "```</answer>")
    assert parsed.query == "a"


# ---------------------------------------------------------------- length budgets


def test_response_over_the_budget_is_too_long_and_penalised_as_format():
    engine = RecordingEngine()
    padding = "x" * (MAX_RESPONSE_CHARS - len(wrap('{"query": "a"}')))
    at_limit = wrap('{"query": "a"}') + padding
    assert len(at_limit) == MAX_RESPONSE_CHARS
    info = {"think_in_prompt": False}
    assert compute_score("pubmed_mini", at_limit, ["1"], info, engine=engine)["error"] == "none"
    result = compute_score("pubmed_mini", at_limit + "x", ["1"], info, engine=engine)
    assert result["error"] == "too_long" and not result["format_ok"]
    assert result["score"] == -4.0 and result["query"] is None  # format_penalty, nothing searched
    assert str(MAX_RESPONSE_CHARS) in result["error_detail"]
    assert engine.calls == ["a"]


def test_query_over_the_budget_is_a_query_syntax_error_without_a_search():
    engine = RecordingEngine()
    info = {"think_in_prompt": False}
    longest = "a" * MAX_QUERY_CHARS
    assert compute_score("pubmed_mini", wrap(json.dumps({"query": longest})), ["1"], info, engine=engine)["error"] == "none"
    result = compute_score("pubmed_mini", wrap(json.dumps({"query": longest + "b"})), ["1"], info, engine=engine)
    assert result["error"] == "query_syntax" and result["query"] is None
    assert result["score"] == 1.0 - 4.0  # format_score + query_syntax_penalty
    assert engine.calls == [longest]
    custom = compute_score("pubmed_mini", wrap(json.dumps({"query": longest + "b"})), ["1"], info,
                           config={"query_syntax_penalty": -2.5}, engine=engine)
    assert custom["score"] == 1.0 - 2.5


# ---------------------------------------------------------------- the linear rewrites equal the regexes

_OLD_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OLD_FENCE_RE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)

_PIECES = st.sampled_from(["<answer>", "</answer>", "<answer", "answer>", "a", " ", "\n", "```", "`", "json",
                           "{", "}", '"', "x-y", "\t"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=30).map("".join))
def test_extract_answer_block_equals_the_old_regex(text):
    matches = _OLD_ANSWER_RE.findall(text)
    assert extract_answer_block(text) == (matches[-1] if matches else None)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=30).map("".join))
def test_strip_fence_equals_the_old_regex(text):
    match = _OLD_FENCE_RE.match(text.strip())
    expected = match.group(1).strip() if match else text.strip()
    assert parsing._strip_fence(text) == expected


def test_local_cost_budget_is_configurable_per_source_and_penalised(tmp_path):
    from pathlib import Path

    from deepretrieval.rewards import literature
    from deepretrieval.search.local import COST_TERM
    from deepretrieval.search.local_index import build_index

    build_index(Path(__file__).parent / "fixtures" / "search" / "small_corpus.jsonl", tmp_path / "idx", progress=False)
    one_term = COST_TERM + 4  # "aspirin" is in 4 titles of the fixture corpus
    config = {"sources": {"pubmed_mini": {"engine": "local", "index_dir": str(tmp_path / "idx"),
                                          "max_query_cost": one_term}}}
    info = {"think_in_prompt": False}
    try:
        ok = compute_score("pubmed_mini", wrap('{"query": "aspirin[ti]"}'), ["d1"], info, config=config)
        assert ok["error"] == "none" and ok["recall"] == 1.0
        over = compute_score("pubmed_mini", wrap('{"query": "aspirin[ti] AND aspirin[ti]"}'), ["d1"], info,
                             config=config)
        assert over["error"] == "query_syntax" and "too expensive" in over["error_detail"]
        assert over["score"] == -3.0 and not over["search_unavailable"]
    finally:
        literature.clear_engines()


def test_query_with_a_lone_surrogate_is_a_query_syntax_error_without_a_search():
    engine = RecordingEngine()
    result = compute_score("pubmed_mini", wrap('{"query": "aspirin \\ud800"}'), ["1"], {"think_in_prompt": False},
                           engine=engine)
    assert result["error"] == "query_syntax" and "not valid Unicode at position 8" in result["error_detail"]
    assert engine.calls == [] and result["score"] == -3.0
    assert parse_answer(wrap('{"query": "aspirin \\ud83d\\ude00"}')).query == "aspirin \U0001F600"  # a valid pair


def test_python_literal_fallback_does_not_print_syntax_warnings():
    """Found by the fuzz test: odd literals made Python's parser print a SyntaxWarning per answer."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parsed = parse_answer("<answer>{'query': 'a' if 1else 'b'}</answer>")
    assert parsed.error == "json"
    assert not [w for w in caught if issubclass(w.category, SyntaxWarning)]
