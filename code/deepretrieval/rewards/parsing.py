"""Answer parsing and format checks for `<think>…</think><answer>{"query": "…"}</answer>` responses.

Parsing takes the *last* `<answer>…</answer>` block and reads a JSON object with a `query` string
from it. It tolerates what models really emit — a code fence around the JSON, text after the
object, Python-style single quotes (only when `ast.literal_eval` reads the object unambiguously),
raw newlines inside strings, a trailing comma — but it never guesses a query out of free text:
`<answer>aspirin AND stroke</answer>` is a `json` error.

Error classes (in the order they are checked): `too_long` (the response is longer than
`MAX_RESPONSE_CHARS`; it is not parsed), `format` (no answer block), `json` (no object, no
`query` string in it, or an object nested deeper than `MAX_JSON_DEPTH`), `empty_query` (a blank
query), `query_syntax` (a query longer than `MAX_QUERY_CHARS`, or with a lone surrogate from a
JSON escape such as `\\ud800`, which no engine is asked to run).

Every step is linear in the length of the response (plain string scans, no backtracking
regular expressions), and nothing raises on any string: see docs/reliability.md.

The format check (`check_format`) wants each tag exactly once and in order
`<think> < </think> < <answer> < </answer>`; when the prompt itself opened `<think>`
(`think_in_prompt`), that tag is counted as if the response had written it, so a response that
writes a second `<think>` fails. Without reasoning (`reasoning=False`) only the answer tags count.

`format_answer` writes the format this module reads; every writer (the prompts' examples, the
warm-up targets, the few-shot turns) calls it, so the format is spelled once.
"""

from __future__ import annotations

import ast
import json
import string
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

from deepretrieval.search.query import MAX_QUERY_CHARS

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
FENCE = "```"
_FENCE_LANGUAGE_CHARS = string.ascii_letters + string.digits + "_-"

# Length budgets (characters). A decoded response is a few hundred to a few thousand characters;
# a response past MAX_RESPONSE_CHARS is not parsed at all (error "too_long").
MAX_RESPONSE_CHARS = 100_000
MAX_JSON_DEPTH = 64  # brackets/braces nested deeper than this: "json" error (Python's json recurses)
MAX_INT_DIGITS = 4_300  # longer JSON integers are read as floats (int() is quadratic; Python caps it)

ERROR_NONE = "none"
ERROR_TOO_LONG = "too_long"
ERROR_FORMAT = "format"
ERROR_JSON = "json"
ERROR_EMPTY_QUERY = "empty_query"
ERROR_QUERY_SYNTAX = "query_syntax"
ERROR_SEARCH_UNAVAILABLE = "search_unavailable"
ERROR_EMPTY_ANSWER = "empty_answer"  # a blank <answer> block, strict (original) reading only
ERROR_REWARD = "reward_error"  # scoring one sample raised unexpectedly (a bug): dropped, not scored
ERROR_CLASSES = (
    ERROR_NONE,
    ERROR_TOO_LONG,
    ERROR_FORMAT,
    ERROR_JSON,
    ERROR_EMPTY_QUERY,
    ERROR_QUERY_SYNTAX,
    ERROR_EMPTY_ANSWER,
    ERROR_SEARCH_UNAVAILABLE,
    ERROR_REWARD,
)


@dataclass
class ParsedAnswer:
    """`query` is set only when `error == "none"`; `answer_text` is the raw last answer block."""

    query: Optional[str]
    error: str
    answer_text: Optional[str] = None
    detail: str = ""


def format_answer(query: str, thinking: Optional[str] = None, lines: bool = False,
                  indent: Optional[int] = None) -> str:
    """A response in the answer format `parse_answer` reads: `<answer>{"query": "..."}</answer>`.

    `thinking`: text of a `<think>` block written before the answer (None: no block). `lines`: each
    tag on a line of its own (`<answer>\\n{...}\\n</answer>`). `indent`: the JSON object's indent
    (as `json.dumps`; None: on one line). Non-ASCII characters are written as they are.
    """
    body = json.dumps({"query": query}, ensure_ascii=False, indent=indent)
    nl = "\n" if lines else ""
    think = "" if thinking is None else f"{THINK_OPEN}{nl}{thinking}{nl}{THINK_CLOSE}{nl}"
    return f"{think}{ANSWER_OPEN}{nl}{body}{nl}{ANSWER_CLOSE}"


def extract_answer_block(text: str) -> Optional[str]:
    """Content of the last complete `<answer>…</answer>` block, or None.

    Blocks are found as a non-greedy regular expression would find them (each from an opening tag
    to the first closing tag after it, left to right), but with `str.find`, so the time is linear
    in the length of the text whatever the tags (the regex was quadratic in unclosed tags)."""
    last, pos = None, 0
    while True:
        start = text.find(ANSWER_OPEN, pos)
        if start < 0:
            return last
        start += len(ANSWER_OPEN)
        end = text.find(ANSWER_CLOSE, start)
        if end < 0:  # no closing tag after this opening tag, hence none after any later one
            return last
        last, pos = text[start:end], end + len(ANSWER_CLOSE)


def _strip_fence(text: str) -> str:
    """The inside of a Markdown code fence (```lang … ```) around the whole text, stripped.

    String operations only, linear in the length (a regex with `\\s*` on both sides of a lazy
    group was cubic in a run of whitespace)."""
    text = text.strip()
    if len(text) < 2 * len(FENCE) or not (text.startswith(FENCE) and text.endswith(FENCE)):
        return text
    inner = text[len(FENCE) : -len(FENCE)]
    return inner.lstrip(_FENCE_LANGUAGE_CHARS).strip()


def _balanced_object(text: str, start: int) -> Tuple[Optional[str], int]:
    """The `{…}` starting at `start`, matched with quote awareness ('…' and "…"), or None; and the
    deepest nesting of brackets and braces seen on the way (one linear scan)."""
    depth, nesting, deepest, quote, escaped = 0, 0, 0, None, False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in ("'", '"'):
            quote = ch
        elif ch in "{[":
            nesting += 1
            deepest = max(deepest, nesting)
            if ch == "{":
                depth += 1
        elif ch in "}]":
            nesting = max(0, nesting - 1)
            if ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1], deepest
    return None, deepest


def _bounded_int(digits: str) -> Any:
    """JSON integers: exact up to MAX_INT_DIGITS digits, a float beyond (never raises)."""
    return int(digits) if len(digits) <= MAX_INT_DIGITS else float(digits)


def _decode_object(text: str) -> Tuple[Optional[Any], str]:
    """First JSON-ish object in `text` (leading text before `{` allowed, trailing text ignored)."""
    start = text.find("{")
    if start < 0:
        return None, "no JSON object in the answer"
    candidate, deepest = _balanced_object(text, start)
    if deepest > MAX_JSON_DEPTH:
        return None, f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    # strict=False: raw newlines/tabs inside strings
    decoder = json.JSONDecoder(strict=False, parse_int=_bounded_int)
    try:
        value, _ = decoder.raw_decode(text, start)
        return value, ""
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        json_error = str(exc)
    if candidate is None:
        return None, f"unbalanced JSON object ({json_error})"
    try:
        # single-quoted keys/strings, trailing commas: a Python literal reads them without guessing;
        # Python's parser warns about odd literals ("1e"), which would print once per bad answer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            value = ast.literal_eval(candidate)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None, f"invalid JSON ({json_error})"
    return value, ""


def _answer_block(text: Any) -> Union[str, ParsedAnswer]:
    """The last `<answer>` block's content, or the classification of a response that has none to
    read: not text, over the length budget (not searched for tags at all), no block."""
    if not isinstance(text, str):
        return ParsedAnswer(None, ERROR_FORMAT, None, "response is not text")
    if len(text) > MAX_RESPONSE_CHARS:
        return ParsedAnswer(None, ERROR_TOO_LONG, None,
                            f"response is {len(text)} characters long (limit {MAX_RESPONSE_CHARS})")
    block = extract_answer_block(text)
    if block is None:
        return ParsedAnswer(None, ERROR_FORMAT, None, "no <answer>...</answer> block")
    return block


def _read_query(value: Any, block: str) -> ParsedAnswer:
    """The `query` string of a decoded answer object, checked against the query budgets."""
    if not isinstance(value, dict):
        return ParsedAnswer(None, ERROR_JSON, block, "answer is not a JSON object")
    if "query" not in value:
        return ParsedAnswer(None, ERROR_JSON, block, 'no "query" key')
    query = value["query"]
    if not isinstance(query, str):
        return ParsedAnswer(None, ERROR_JSON, block, '"query" is not a string')
    query = query.strip()
    if not query:
        return ParsedAnswer(None, ERROR_EMPTY_QUERY, block, "blank query")
    if len(query) > MAX_QUERY_CHARS:
        return ParsedAnswer(None, ERROR_QUERY_SYNTAX, block,
                            f"query is {len(query)} characters long (limit {MAX_QUERY_CHARS})")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as exc:  # a JSON escape such as \ud800: no engine can send it
        return ParsedAnswer(None, ERROR_QUERY_SYNTAX, block,
                            f"query contains a character that is not valid Unicode at position {exc.start}")
    return ParsedAnswer(query, ERROR_NONE, block)


def parse_answer(text: str) -> ParsedAnswer:
    """Read the query from the last `<answer>` block of a response."""
    block = _answer_block(text)
    if isinstance(block, ParsedAnswer):
        return block
    value, problem = _decode_object(_strip_fence(block))
    if problem:
        return ParsedAnswer(None, ERROR_JSON, block, problem)
    return _read_query(value, block)


def check_format(text: str, think_in_prompt: bool = False, reasoning: bool = True) -> Tuple[bool, str]:
    """Tags once each and in order; returns (ok, reason). See the module docstring."""
    if not isinstance(text, str):
        return False, "response is not text"
    if reasoning and think_in_prompt:
        text = THINK_OPEN + text
    tags = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE) if reasoning else (ANSWER_OPEN, ANSWER_CLOSE)
    positions = []
    for tag in tags:
        count = text.count(tag)
        if count != 1:
            return False, f"{tag} appears {count} times (expected 1)"
        positions.append(text.find(tag))
    if positions != sorted(positions):
        order = "".join(tags)
        return False, f"tags out of order (expected {order})"
    return True, ""


# ---------------------------------------------------------------- strict reading (the original's)

def parse_answer_strict(text: str) -> ParsedAnswer:
    """Read the query the way the original DeepRetrieval reward did: the last `<answer>` block,
    stripped, must be exactly one JSON document (`json.loads`, strict: no code fence, no text
    around it, no single quotes, trailing comma, raw newline/tab inside a string, second object
    or Python literal) holding an object with a `query` string.

    Error classes: `format` (no answer block), `empty_answer` (a blank block: the original did not
    search it and gave it answer score 0, not a penalty), `json` (anything json.loads or the
    `query` lookup rejects), `empty_query` (a blank query string); the length budgets of the lenient
    reading apply too (`too_long`, and `query_syntax` for an over-long or invalid-Unicode query)."""
    block = _answer_block(text)
    if isinstance(block, ParsedAnswer):
        return block
    stripped = block.strip()
    if not stripped:
        return ParsedAnswer(None, ERROR_EMPTY_ANSWER, block, "blank <answer> block")
    try:
        value = json.loads(stripped)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so are 4,300+ digit ints
        return ParsedAnswer(None, ERROR_JSON, block, f"not one strict JSON document ({exc})")
    return _read_query(value, block)
