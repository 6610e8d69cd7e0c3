"""Answer parsing and format checks for `<think>…</think><answer>{"query": "…"}</answer>` responses.

Parsing takes the *last* `<answer>…</answer>` block and reads a JSON object with a `query` string
from it. It tolerates what models really emit — a code fence around the JSON, text after the
object, Python-style single quotes (only when `ast.literal_eval` reads the object unambiguously),
raw newlines inside strings, a trailing comma — but it never guesses a query out of free text:
`<answer>aspirin AND stroke</answer>` is a `json` error.

Error classes (in the order they are checked): `format` (no answer block), `json` (no object, or
no `query` string in it), `empty_query` (a blank query).

The format check (`check_format`) wants each tag exactly once and in order
`<think> < </think> < <answer> < </answer>`; when the prompt itself opened `<think>`
(`think_in_prompt`), that tag is counted as if the response had written it, so a response that
writes a second `<think>` fails. Without reasoning (`reasoning=False`) only the answer tags count.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Optional, Tuple

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FENCE_RE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)

ERROR_NONE = "none"
ERROR_FORMAT = "format"
ERROR_JSON = "json"
ERROR_EMPTY_QUERY = "empty_query"
ERROR_QUERY_SYNTAX = "query_syntax"
ERROR_SEARCH_UNAVAILABLE = "search_unavailable"
ERROR_CLASSES = (
    ERROR_NONE,
    ERROR_FORMAT,
    ERROR_JSON,
    ERROR_EMPTY_QUERY,
    ERROR_QUERY_SYNTAX,
    ERROR_SEARCH_UNAVAILABLE,
)


@dataclass
class ParsedAnswer:
    """`query` is set only when `error == "none"`; `answer_text` is the raw last answer block."""

    query: Optional[str]
    error: str
    answer_text: Optional[str] = None
    detail: str = ""


def extract_answer_block(text: str) -> Optional[str]:
    """Content of the last complete `<answer>…</answer>` block, or None."""
    matches = _ANSWER_RE.findall(text)
    return matches[-1] if matches else None


def _strip_fence(text: str) -> str:
    match = _FENCE_RE.match(text.strip())
    return match.group(1).strip() if match else text.strip()


def _balanced_object(text: str, start: int) -> Optional[str]:
    """The `{…}` starting at `start`, matched with quote awareness ('…' and "…"), or None."""
    depth, quote, escaped = 0, None, False
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
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def _decode_object(text: str) -> Tuple[Optional[Any], str]:
    """First JSON-ish object in `text` (leading text before `{` allowed, trailing text ignored)."""
    start = text.find("{")
    if start < 0:
        return None, "no JSON object in the answer"
    decoder = json.JSONDecoder(strict=False)  # strict=False: raw newlines/tabs inside strings
    try:
        value, _ = decoder.raw_decode(text, start)
        return value, ""
    except json.JSONDecodeError as exc:
        json_error = str(exc)
    candidate = _balanced_object(text, start)
    if candidate is None:
        return None, f"unbalanced JSON object ({json_error})"
    try:
        # single-quoted keys/strings, trailing commas: a Python literal reads them without guessing
        value = ast.literal_eval(candidate)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None, f"invalid JSON ({json_error})"
    return value, ""


def parse_answer(text: str) -> ParsedAnswer:
    """Read the query from the last `<answer>` block of a response."""
    if not isinstance(text, str):
        return ParsedAnswer(None, ERROR_FORMAT, None, "response is not text")
    block = extract_answer_block(text)
    if block is None:
        return ParsedAnswer(None, ERROR_FORMAT, None, "no <answer>...</answer> block")
    value, problem = _decode_object(_strip_fence(block))
    if problem:
        return ParsedAnswer(None, ERROR_JSON, block, problem)
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
    return ParsedAnswer(query, ERROR_NONE, block)


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

ERROR_EMPTY_ANSWER = "empty_answer"


def parse_answer_strict(text: str) -> ParsedAnswer:
    """Read the query the way the original DeepRetrieval reward did: the last `<answer>` block,
    stripped, must be exactly one JSON document (`json.loads`, strict: no code fence, no text
    around it, no single quotes, trailing comma, raw newline/tab inside a string, second object
    or Python literal) holding an object with a `query` string.

    Error classes: `format` (no answer block), `empty_answer` (a blank block: the original did not
    search it and gave it answer score 0, not a penalty), `json` (anything json.loads or the
    `query` lookup rejects), `empty_query` (a blank query string)."""
    if not isinstance(text, str):
        return ParsedAnswer(None, ERROR_FORMAT, None, "response is not text")
    block = extract_answer_block(text)
    if block is None:
        return ParsedAnswer(None, ERROR_FORMAT, None, "no <answer>...</answer> block")
    stripped = block.strip()
    if not stripped:
        return ParsedAnswer(None, ERROR_EMPTY_ANSWER, block, "blank <answer> block")
    try:
        value = json.loads(stripped)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        return ParsedAnswer(None, ERROR_JSON, block, f"not one strict JSON document ({exc})")
    if not isinstance(value, dict):
        return ParsedAnswer(None, ERROR_JSON, block, "answer is not a JSON object")
    if "query" not in value:
        return ParsedAnswer(None, ERROR_JSON, block, 'no "query" key')
    query = value["query"]
    if not isinstance(query, str):
        return ParsedAnswer(None, ERROR_JSON, block, '"query" is not a string')
    if not query.strip():
        return ParsedAnswer(None, ERROR_EMPTY_QUERY, block, "blank query")
    return ParsedAnswer(query.strip(), ERROR_NONE, block)
