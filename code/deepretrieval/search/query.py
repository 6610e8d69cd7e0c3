"""PubMed query syntax (and the Ovid MEDLINE syntax of expert searches) -> syntax tree.

Grammar, as PubMed applies it:

- ``AND`` / ``OR`` / ``NOT`` are evaluated strictly left to right (no precedence), so
  ``a OR b AND c`` is ``(a OR b) AND c``; parentheses group. ``A AND NOT B`` is A without B.
  Adjacent terms without an operator are joined by AND (the same left-to-right level).
  PubMed operators are upper case; a lower-case ``and``/``or``/``not`` is searched as a word
  (with a warning). In Ovid searches operators are case-insensitive.
- ``"quoted phrase"``; a multi-word term followed by a field tag is a phrase too
  (``kidney allograft[tiab]``), as are hyphenated words (the tokenizer splits them).
- Truncation ``term*`` (also Ovid ``$``, ``$N``, mid-word ``#`` = one character and
  ``?`` = zero or one character in Ovid searches).
- Field tags: ``[tiab] [ti] [ab] [tw] [mh] [mesh] [MeSH Terms] [mh:noexp] [majr] [sh] [pt]
  [dp] [All Fields] [ot] [pmid]`` and long forms (``[Title/Abstract]`` ...); ``[tiab:~N]``
  proximity. Tags of fields a local index lacks (``[au] [la] [nm] [jour] ...``) parse to an
  `Absent` node that matches nothing, with a warning; any other tag is a `QuerySyntaxError`.
- ``[dp]``: ``2005[dp]``, ``2005/03[dp]``, ``2001:2005[dp]``, ``"2001/01/01"[dp] : "2005"[dp]``.
- Multi-line searches: non-empty lines are numbered 1, 2, ... (or by a leading ``1.`` / ``#1``
  label); ``#N`` refers to line N, which must come earlier; the last line is the query.

Ovid MEDLINE lines (CLEF expert searches) are recognised by their markers and parsed in an Ovid
dialect: ``Heading/`` (MeSH), ``exp Heading/``, ``*Heading/`` (major), ``Heading/du, pa``
(subheadings), ``term.ti,ab.`` field suffixes (on terms and groups), ``adjN`` proximity,
bare line numbers as references, ``or/1-5`` / ``and/6,49`` combinations and
``limit N to ...`` (``yr="2005 -Current"`` becomes a date range; other limits are not
evaluable locally and are dropped with a warning). Bracketed annotations after an Ovid field
(``[Diagnostic Use]``, ``[mp=title, ...]``) are comments.

`parse(query) -> Query` returns the tree (`deepretrieval.search.query_tree`) of the final line
with earlier lines resolved into `lines`; errors raise `QuerySyntaxError(problem, position,
query)` with 0-based offsets into the original query string.

Budgets (a query over them is the query writer's fault: `QuerySyntaxError`): at most
`MAX_QUERY_CHARS` characters, parentheses nested at most `MAX_QUERY_DEPTH` deep, and a tree at
most `MAX_QUERY_DEPTH` levels deep with line references inlined (every node knows its `depth`),
so that code walking a parsed tree recursively never reaches Python's recursion limit. Parsing
is linear in the length of the query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Collection, Dict, List, Optional, Tuple

from deepretrieval.search.base import QuerySyntaxError
from deepretrieval.search.query_tree import (OVID_CODES, OVID_SUBHEADINGS, PUBMED_TAGS, Absent, And, DateRange,
                                             FieldSpec, Heading, Limit, Near, Node, Not, Or, Query, Ref, Text,
                                             expanded_depth)

MAX_QUERY_CHARS = 20_000  # longest expert search in the vendored data: 2,419 characters
MAX_QUERY_DEPTH = 100  # nesting of parentheses, and of the tree with line references inlined
MAX_NUMBER_DIGITS = 9  # line numbers, distances, limits: longer numbers are errors (int() is not linear)


def _number(text: str) -> Optional[int]:
    """The value of a decimal number of at most MAX_NUMBER_DIGITS digits, else None (`isdigit`
    is true for characters such as '²' that `int` refuses; `isdecimal` is what `int` reads)."""
    return int(text) if text.isdecimal() and len(text) <= MAX_NUMBER_DIGITS else None


# ----------------------------------------------------------------------------- lexer

_SUBHEADINGS_AFTER_SLASH = re.compile(r"/([a-z]{2}(?:\s*,\s*[a-z]{2})*)(?![a-z])", re.I)
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
                         "\u2018": "'", "\u2019": "'"})

_OVID_SUFFIX = re.compile(r"\.((?:[a-z]{2})(?:\s*,\s*[a-z]{2})*)(\.?)(?=$|[\s)\[])", re.I)
# Regular expressions here are written so that no two unbounded repeats can match the same
# characters (no `^\s*` under re.M, which re-scans a run of blank lines from every line start;
# no `(.+?)\s*$`): each runs in time linear in its input (tests/test_fuzz_query.py).
OVID_MARKERS = [
    re.compile(r"^[^\S\n]*(and|or)\s*/\s*\d", re.I | re.M),
    re.compile(r"\.(mp|tw|ti|ab|sh|ot|nm|rn|au|ed|kw|kf|hw|pt|fs|yr)(,[a-z]{2})*\.?(?=$|[\s)\[])", re.I | re.M),
    re.compile(r"/\s*($|\))|/\s+(or|and|not)\b", re.I | re.M),
    re.compile(r"/(%s)(\s*,\s*[a-z]{2})*(?![a-z/])" % "|".join(sorted(OVID_SUBHEADINGS)), re.I | re.M),
    re.compile(r"\badj\d*\b", re.I),
    re.compile(r"^[^\S\n]*exp\s", re.I | re.M),
    re.compile(r"^[^\S\n]*limit\s+\d+\s+to\b", re.I | re.M),
]


def detect_dialect(text: str) -> str:
    """"ovid" when the text carries Ovid MEDLINE markers, else "pubmed"."""
    return "ovid" if any(p.search(text) for p in OVID_MARKERS) else "pubmed"


@dataclass
class Tok:
    kind: str  # LP RP WORD QUOTED TAG SUFFIX SLASH COMMA REF OP ADJ
    value: str
    pos: int
    end: int
    extra: object = None


class _Lexer:
    def __init__(self, text: str, offset: int, query: str, dialect: str, warnings: List[str]):
        self.s, self.offset, self.query, self.ovid, self.warnings = text, offset, query, dialect == "ovid", warnings

    def error(self, problem: str, pos: int) -> QuerySyntaxError:
        return QuerySyntaxError(problem, self.offset + pos, self.query)

    def _suffix(self, i: int, toks: List[Tok]) -> int:
        """An Ovid field suffix (".ti,ab.") right at i; returns the new index."""
        if not self.ovid:
            return i
        m = _OVID_SUFFIX.match(self.s, i)
        if m:
            codes = [c.strip().lower() for c in m.group(1).split(",")]
            if all(c in OVID_CODES for c in codes):
                toks.append(Tok("SUFFIX", m.group(0), i, m.end(), codes))
                return m.end()
        return i

    def tokens(self) -> List[Tok]:
        s, n, i, toks = self.s, len(self.s), 0, []
        while i < n:
            c = s[i]
            if c.isspace():
                i += 1
            elif c == "(":
                toks.append(Tok("LP", c, i, i + 1)); i += 1
            elif c == ")":
                toks.append(Tok("RP", c, i, i + 1)); i += 1
                i = self._suffix(i, toks)
            elif c == '"':
                j = s.find('"', i + 1)
                if j < 0:
                    # PubMed ignores an unmatched quotation mark; so do we, but say so.
                    self.warnings.append(f"unmatched quotation mark at position {self.offset + i} ignored")
                    i += 1
                    continue
                toks.append(Tok("QUOTED", s[i + 1:j], i, j + 1)); i = j + 1
                i = self._suffix(i, toks)
            elif c == "[":
                j = s.find("]", i + 1)
                if j < 0:
                    raise self.error("unterminated field tag '[' (missing ']')", i)
                toks.append(Tok("TAG", s[i + 1:j], i, j + 1)); i = j + 1
            elif c == "]":
                raise self.error("']' without a matching '['", i)
            elif c == ",":
                toks.append(Tok("COMMA", c, i, i + 1)); i += 1
            elif c == "/" and self.ovid:
                m = _SUBHEADINGS_AFTER_SLASH.match(s, i)
                quals: Tuple[str, ...] = ()
                end = i + 1
                if m:
                    codes = tuple(q.strip().lower() for q in m.group(1).split(","))
                    if all(q in OVID_SUBHEADINGS for q in codes):
                        quals, end = codes, m.end()
                toks.append(Tok("SLASH", s[i:end], i, end, quals)); i = end
            elif c == "#" and i + 1 < n and s[i + 1].isdecimal():
                j = i + 1
                while j < n and s[j].isdecimal():
                    j += 1
                toks.append(Tok("REF", s[i + 1:j], i, j)); i = j
            elif c == ":" and not self.ovid:
                toks.append(Tok("COLON", c, i, i + 1)); i += 1
            else:
                j = i
                stop = '()[]",' + ("/" if self.ovid else ":")
                suffix_at = -1
                while j < n and not s[j].isspace() and s[j] not in stop:
                    if s[j] == "." and self.ovid:
                        m = _OVID_SUFFIX.match(s, j)
                        if m and all(c.strip().lower() in OVID_CODES for c in m.group(1).split(",")):
                            suffix_at = j
                            break
                    j += 1
                word = s[i:j]
                if word:
                    upper = word if not self.ovid else word.upper()
                    if upper in ("AND", "OR", "NOT"):
                        toks.append(Tok("OP", upper, i, j))
                    elif self.ovid and re.fullmatch(r"adj\d*", word, re.I):
                        dist = _number(word[3:]) if len(word) > 3 else 1
                        if dist is None:
                            raise self.error(f"proximity distance in {word[:20]!r} is too large", i)
                        toks.append(Tok("ADJ", word, i, j, dist))
                    else:
                        if word.lower() in ("and", "or", "not") and not self.ovid:
                            self.warnings.append(
                                f"lower-case '{word}' at position {self.offset + i} is searched as a word; "
                                "PubMed operators are AND, OR, NOT")
                        toks.append(Tok("WORD", word, i, j))
                i = self._suffix(j, toks) if suffix_at >= 0 else j
        return toks


# ----------------------------------------------------------------------------- parser

_DP_VALUE = re.compile(r"^\d{4}(?:[/\-]\d{1,2}(?:[/\-]\d{1,2})?)?$")


def _valid_date(value: str) -> bool:
    if not _DP_VALUE.match(value):
        return False
    parts = [int(p) for p in re.split(r"[/\-]", value)]
    return (len(parts) < 2 or 1 <= parts[1] <= 12) and (len(parts) < 3 or 1 <= parts[2] <= 31)


def _date_bounds(value: str) -> Optional[Tuple[int, int]]:
    from deepretrieval.search.ingest import parse_date

    value = value.strip()
    if ":" in value:
        a, _, b = value.partition(":")
        a, b = a.strip().strip('"'), b.strip().strip('"')
        if not (_valid_date(a) and _valid_date(b)):
            return None
        bounds = parse_date(a), parse_date(b, end=True)
    elif not _valid_date(value):
        return None
    else:
        bounds = parse_date(value), parse_date(value, end=True)
    return None if None in bounds else bounds  # parse_date: None for a day that does not exist


class _Parser:
    def __init__(self, toks: List[Tok], line_text: str, offset: int, query: str, dialect: str,
                 line_no: int, known_lines: Collection[int], warnings: List[str]):
        self.toks, self.i = toks, 0
        self.s, self.offset, self.query, self.ovid = line_text, offset, query, dialect == "ovid"
        self.line_no, self.known, self.warnings = line_no, known_lines, warnings

    # helpers
    def error(self, problem: str, pos: int) -> QuerySyntaxError:
        return QuerySyntaxError(problem, self.offset + pos, self.query)

    def peek(self, k: int = 0) -> Optional[Tok]:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def take(self) -> Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def ref(self, n: int, pos: int) -> Ref:
        if n >= self.line_no:
            raise self.error(f"line reference #{n} does not refer to an earlier line (this is line {self.line_no})", pos)
        if n not in self.known:
            raise self.error(f"line reference #{n}: there is no line {n}", pos)
        return Ref(self.offset + pos, n)

    # grammar
    def parse(self) -> Node:
        if not self.toks:
            raise self.error("empty query", 0)
        node = self.expr()
        t = self.peek()
        if t is not None:
            if t.kind == "RP":
                raise self.error("unbalanced parenthesis: ')' without a matching '('", t.pos)
            raise self.error(f"unexpected {t.value!r}", t.pos)
        return node

    def starts_operand(self, t: Optional[Tok]) -> bool:
        return t is not None and t.kind in ("LP", "WORD", "QUOTED", "REF")

    def expr(self) -> Node:
        t = self.peek()
        if t is None:
            raise self.error("expected a term", len(self.s))
        if t.kind == "OP":
            raise self.error(f"dangling operator {t.value}: nothing on its left", t.pos)
        run = _Run(self, self.near())
        while True:
            t = self.peek()
            if t is None or t.kind == "RP":
                return run.close()
            if t.kind == "OP":
                op = self.take()
                name = op.value
                if name == "AND" and self.peek() is not None and self.peek().kind == "OP" and self.peek().value == "NOT":
                    self.take()
                    name = "NOT"
                nxt = self.peek()
                if not self.starts_operand(nxt):
                    what = "end of query" if nxt is None else repr(nxt.value)
                    raise self.error(f"dangling operator {op.value}: {what} follows it", op.pos)
                right = self.near()
                run.add(name, right)
            elif self.starts_operand(t):
                run.add("AND", self.near())  # implicit AND
            elif t.kind in ("TAG", "SUFFIX", "SLASH"):
                raise self.error(f"field tag {t.value!r} does not follow a term", t.pos)
            elif t.kind == "ADJ":
                raise self.error(f"dangling operator {t.value}", t.pos)
            else:
                raise self.error(f"unexpected {t.value!r}", t.pos)

    def bounded(self, node: Node) -> Node:
        """`node`, unless its tree is deeper than MAX_QUERY_DEPTH (a QuerySyntaxError)."""
        if node.depth > MAX_QUERY_DEPTH:
            raise QuerySyntaxError(
                f"query nested too deeply: more than {MAX_QUERY_DEPTH} levels of operators "
                "(every change between AND, OR and NOT, every NOT and every group adds one)", node.pos, self.query)
        return node

    def near(self) -> Node:
        left = self.primary()
        while self.peek() is not None and self.peek().kind == "ADJ":
            op = self.take()
            if not self.starts_operand(self.peek()):
                raise self.error(f"dangling operator {op.value}", op.pos)
            right = self.primary()
            # Ovid: "adj" = next to each other in order; "adjN" = within N-1 words, any order.
            ordered = op.extra == 1 and op.value.lower() == "adj"
            left = self.bounded(Near(left.pos, left, right, max(0, int(op.extra) - 1), ordered))
        return left

    def postfix_field(self) -> Optional[Tuple[List[FieldSpec], Tok]]:
        """A field tag or Ovid suffix after an operand; Ovid bracket annotations are skipped."""
        t = self.peek()
        if t is None:
            return None
        if t.kind == "TAG":
            self.take()
            return [self.tag_spec(t)], t
        if t.kind == "SUFFIX":
            self.take()
            self.skip_annotation()
            return [OVID_CODES[c] for c in t.extra], t
        return None

    def skip_annotation(self) -> None:
        if self.ovid and self.peek() is not None and self.peek().kind == "TAG":
            self.take()

    def tag_spec(self, t: Tok) -> FieldSpec:
        name = re.sub(r"\s+", " ", t.value.strip().lower())
        m = re.fullmatch(r"(tiab|ti|ab|tw|title/abstract|title|abstract):~\s*(\d+)", name)
        if m:
            slop = _number(m.group(2))
            if slop is None:
                raise self.error(f"proximity distance in [{t.value[:20]}] is too large", t.pos)
            return replace(PUBMED_TAGS[m.group(1)], slop=slop, name=name)
        spec = PUBMED_TAGS.get(name)
        if spec is None:
            raise self.error(f"unknown field tag [{t.value}]", t.pos)
        return spec

    def primary(self) -> Node:
        t = self.peek()
        if t is None:
            raise self.error("expected a term", len(self.s))
        if t.kind == "LP":
            self.take()
            if self.peek() is None:
                raise self.error("unbalanced parenthesis: '(' is never closed", t.pos)
            if self.peek().kind == "RP":
                raise self.error("empty parentheses", t.pos)
            inner = self.expr()
            close = self.peek()
            if close is None or close.kind != "RP":
                raise self.error("unbalanced parenthesis: '(' is never closed", t.pos)
            self.take()
            post = self.postfix_field()
            return self.bounded(self.apply_specs(inner, post[0], post[1])) if post else inner
        if t.kind == "REF":
            self.take()
            n = _number(t.value)
            if n is None:
                raise self.error(f"line reference #{t.value[:12]}... is not a line number (too long)", t.pos)
            return self.ref(n, t.pos)
        if t.kind == "QUOTED":
            self.take()
            text = t.value.strip()
            if not text:
                raise self.error("empty quoted phrase", t.pos)
            if self.peek() is not None and self.peek().kind == "SLASH":
                return self.heading(text, t.pos, self.take())
            post = self.postfix_field()
            node = Text(self.offset + t.pos, text, None, True)
            return self.apply_specs(node, post[0], post[1]) if post else node
        if t.kind == "WORD":
            return self.word_run()
        if t.kind == "OP":
            raise self.error(f"dangling operator {t.value}", t.pos)
        if t.kind == "RP":
            raise self.error("unbalanced parenthesis: ')' without a matching '('", t.pos)
        if t.kind in ("TAG", "SUFFIX", "SLASH"):
            raise self.error(f"field tag {t.value!r} does not follow a term", t.pos)
        if t.kind == "ADJ":
            raise self.error(f"dangling operator {t.value}", t.pos)
        raise self.error(f"unexpected {t.value!r}", t.pos)

    def word_run(self) -> Node:
        start = self.i
        while self.peek() is not None and self.peek().kind in ("WORD", "COMMA", "COLON"):
            self.take()
        run = self.toks[start:self.i]
        # a trailing comma/colon belongs to nobody
        while run and run[-1].kind in ("COMMA", "COLON"):
            run.pop()
        first, last = run[0], run[-1]
        text = re.sub(r"\s+", " ", self.s[first.pos:last.end])
        nxt = self.peek()
        if (self.ovid and text.lower() == "exp" and nxt is not None and nxt.kind == "QUOTED"
                and self.peek(1) is not None and self.peek(1).kind == "SLASH"):
            quoted = self.take()
            return replace(self.heading(quoted.value, quoted.pos, self.take()), pos=self.offset + first.pos,
                           explode=True)
        if nxt is not None and nxt.kind == "SLASH":
            return self.heading(text, first.pos, self.take())
        post = self.postfix_field()
        if post is not None:
            node: Node = Text(self.offset + first.pos, text, None, True)
            return self.apply_specs(node, post[0], post[1])
        words = [w for w in run if w.kind == "WORD"]
        if self.ovid and not all(w.value.isdecimal() for w in words):
            # Ovid searches adjacent words as a phrase
            return Text(self.offset + first.pos, text, None, len(words) > 1)
        # untagged run: each word is a term, joined by implicit AND
        items: List[Node] = []
        for w in run:
            if w.kind != "WORD":
                continue
            n = _number(w.value) if self.ovid else None
            if n is not None and 1 <= n < self.line_no and n in self.known:
                items.append(Ref(self.offset + w.pos, n))
            else:
                items.append(Text(self.offset + w.pos, w.value, None, False))
        if not items:
            raise self.error("expected a term", first.pos)
        return items[0] if len(items) == 1 else And(items[0].pos, tuple(items))

    def heading(self, text: str, pos: int, slash: Tok) -> Node:
        explode = major = False
        name = text.strip()
        if re.match(r"^exp\s+", name, re.I):
            explode, name = True, re.sub(r"^exp\s+", "", name, flags=re.I)
        if name.startswith("*"):
            major, name = True, name[1:].strip()
        name = name.strip().strip('"').strip()
        if not name:
            raise self.error("empty MeSH heading before '/'", pos)
        quals = tuple(OVID_SUBHEADINGS[q] for q in slash.extra or ())
        self.skip_annotation()
        return Heading(self.offset + pos, "majr" if major else "mesh", name, quals, explode)

    def apply_specs(self, node: Node, specs: List[FieldSpec], tok: Tok) -> Node:
        variants = [self.apply_spec(node, spec, tok) for spec in _merge_text_specs(specs)]
        return variants[0] if len(variants) == 1 else Or(node.pos, tuple(variants))

    def apply_spec(self, node: Node, spec: FieldSpec, tok: Tok) -> Node:
        """Give `spec` to every leaf that has no field yet (a tag after a group applies inside)."""
        if isinstance(node, Text):
            if node.spec is not None:
                return node
            if spec.kind == "text":
                return replace(node, spec=spec)
            if spec.kind == "absent":
                return Absent(node.pos, spec.name, node.text)
            if spec.kind == "date":
                bounds = _date_bounds(node.text)
                if bounds is None or None in bounds:
                    raise QuerySyntaxError(f"invalid publication date {node.text!r} (use YYYY, YYYY/MM/DD or YYYY:YYYY)",
                                           node.pos, self.query)
                return DateRange(node.pos, bounds[0], bounds[1])
            name = node.text
            quals: Tuple[str, ...] = ()
            if spec.kind in ("mesh", "majr") and "/" in name:
                name, _, q = name.partition("/")
                quals = tuple(x.strip().lower() for x in q.split("/") if x.strip())
                name = name.strip()
            wildcard = name.endswith("*")
            return Heading(node.pos, spec.kind, name.rstrip("*").strip() if wildcard else name, quals, False, wildcard)
        if isinstance(node, (And, Or)):
            return type(node)(node.pos, tuple(self.apply_spec(i, spec, tok) for i in node.items))
        if isinstance(node, Not):
            return Not(node.pos, self.apply_spec(node.positive, spec, tok), self.apply_spec(node.negative, spec, tok))
        if isinstance(node, Near):
            if spec.kind not in ("text", "absent"):
                raise self.error(f"proximity search needs a text field, not {spec.name}", tok.pos)
            return replace(node, left=self.apply_spec(node.left, spec, tok), right=self.apply_spec(node.right, spec, tok))
        return node  # refs, headings, dates keep their own meaning


class _Run:
    """A left-to-right chain of binary operators being parsed: consecutive operands of the same
    AND/OR are collected in a list (one node at the end, not a tuple copied per operand, which
    was quadratic), and the tree is the one PubMed's strict left-to-right evaluation gives:
    `a OR b AND c` -> And(Or(a, b), c); an operand that is already an And/Or of the same kind
    (a parenthesised group) is flattened into the run, as before."""

    def __init__(self, parser: "_Parser", first: Node):
        self.parser, self.left = parser, first
        self.op: Optional[str] = None  # the operator of the open run, if any
        self.items: List[Node] = []

    def close(self) -> Node:
        """The tree so far (the open AND/OR run becomes one node)."""
        if self.op is not None:
            cls = And if self.op == "AND" else Or
            self.left = self.parser.bounded(cls(self.items[0].pos, tuple(self.items)))
            self.op, self.items = None, []
        return self.left

    def add(self, op: str, right: Node) -> None:
        if op == self.op:
            self.items.append(right)
            return
        left = self.close()
        if op in ("AND", "OR"):
            cls = And if op == "AND" else Or
            self.op = op
            self.items = list(left.items) if isinstance(left, cls) else [left]
            self.items.append(right)  # every item is within the budget; close() checks the node
        else:
            self.left = self.parser.bounded(Not(left.pos, left, right))


def _merge_text_specs(specs: List[FieldSpec]) -> List[FieldSpec]:
    """`.ti,ab.` -> one text spec over both fields; other kinds stay separate (OR-ed)."""
    text_fields: List[str] = []
    out: List[FieldSpec] = []
    for s in specs:
        if s.kind == "text" and s.slop is None:
            text_fields.extend(f for f in s.fields if f not in text_fields)
        else:
            out.append(s)
    if text_fields:
        out.insert(0, FieldSpec("text", tuple(text_fields), name=",".join(s.name for s in specs if s.kind == "text")))
    return out


# ----------------------------------------------------------------------------- lines

_LABEL = re.compile(r"^\s*(#?)(\d+)([.):]?)\s+(?=\S)")
# (groups 2 take trailing whitespace with them: callers strip it)
OVID_COMBINE = re.compile(r"^\s*(and|or)\s*/\s*([\d\s,\-]+)$", re.I)
OVID_LIMIT = re.compile(r"^\s*limit\s+(\d+)\s+to\s+(.+)$", re.I)
OVID_YEAR_LIMIT = re.compile(r'^yr\s*=\s*"?\s*(\d{4})(?:\s*-\s*(\d{4}|current)?)?\s*"?$', re.I)


def _split_lines(text: str) -> List[Tuple[int, str]]:
    """Non-empty lines with their offsets into the query."""
    out, offset = [], 0
    for raw in text.splitlines(keepends=True):
        if raw.strip():
            out.append((offset, raw.rstrip("\r\n")))
        offset += len(raw)
    return out


def parse(query: str, dialect: Optional[str] = None) -> Query:
    """Parse a PubMed (or Ovid) search, one line or a multi-line search with line references."""
    if not isinstance(query, str):
        raise QuerySyntaxError("query must be a string", 0, str(query)[:200])
    if len(query) > MAX_QUERY_CHARS:
        raise QuerySyntaxError(f"query is {len(query)} characters long (limit {MAX_QUERY_CHARS})",
                               MAX_QUERY_CHARS, query)
    text = query.translate(_QUOTES)  # same length, so positions still match the original
    lines = _split_lines(text)
    if not lines:
        raise QuerySyntaxError("empty query", 0, query)
    dialect = dialect or detect_dialect(text)
    warnings: List[str] = []
    parsed: Dict[int, Node] = {}
    depths: Dict[int, int] = {}  # line -> depth of its tree with references inlined
    expected = 1
    last: Optional[Node] = None
    for offset, line in lines:
        number = expected
        body_start = 0
        m = _LABEL.match(line)
        if m and len(lines) > 1:
            n = _number(m.group(2))
            rest = line[m.end():]
            # A leading number is a label when it is marked (1. / 1) / #1: ...) or when, read as
            # a reference, it would refer to its own line (impossible) - "#1 foo" on line 1.
            is_op_next = re.match(r"^(AND|OR|NOT)\b", rest, re.I if dialect == "ovid" else 0)
            if n is not None and (m.group(3) or n == expected) and not is_op_next and n not in parsed:
                number, body_start = n, m.end()
        body = line[body_start:]
        node = _parse_line(body, offset + body_start, query, dialect, number, parsed.keys(), warnings)
        depths[number] = expanded_depth(node, depths)
        if depths[number] > MAX_QUERY_DEPTH:
            raise QuerySyntaxError(f"query nested too deeply: line {number} is more than {MAX_QUERY_DEPTH} levels "
                                   "deep with its line references inlined", offset + body_start, query)
        parsed[number] = node
        last = node
        expected = number + 1
    assert last is not None
    root = parsed.pop(number)
    return Query(query, root, parsed, dialect, warnings)


def _parse_line(body: str, offset: int, query: str, dialect: str, number: int,
                known: Collection[int], warnings: List[str]) -> Node:
    if dialect == "ovid":
        m = OVID_COMBINE.match(body)
        if m:
            refs: List[Node] = []
            for part in re.split(r"\s*,\s*", m.group(2).strip()):
                pos = offset + body.index(part, m.start(2)) if part else offset
                if not part:
                    raise QuerySyntaxError("empty line number in combination", pos, query)
                a, _, b = part.partition("-")
                lo, hi = _number(a.strip()), _number(b.strip()) if b else _number(a.strip())
                if lo is None or hi is None:
                    raise QuerySyntaxError(f"line numbers in {part[:30]!r} are not valid", pos, query)
                if hi < lo:
                    raise QuerySyntaxError(f"line range {part} runs backwards", pos, query)
                for n in range(lo, hi + 1):
                    if n >= number or n not in known:
                        raise QuerySyntaxError(f"line reference {n} does not refer to an earlier line", pos, query)
                    refs.append(Ref(pos, n))
            return (And if m.group(1).lower() == "and" else Or)(offset, tuple(refs)) if len(refs) > 1 else refs[0]
        m = OVID_LIMIT.match(body)
        if m:
            n = _number(m.group(1))
            pos = offset + m.start(1)
            if n is None:
                raise QuerySyntaxError("limit refers to a line number that is too long", pos, query)
            if n >= number or n not in known:
                raise QuerySyntaxError(f"limit refers to line {n}, which is not an earlier line", pos, query)
            what = m.group(2).strip()
            yr = OVID_YEAR_LIMIT.match(what)
            date = None
            if yr:
                lo = int(yr.group(1)) * 10000 + 101
                hi_s = yr.group(2)
                hi = 99991231 if hi_s is None or hi_s.lower() == "current" else int(hi_s) * 10000 + 1231
                if "-" not in what:
                    hi = int(yr.group(1)) * 10000 + 1231
                date = DateRange(offset + m.start(2), lo, hi)
            return Limit(offset, Ref(pos, n), what, date)
    toks = _Lexer(body, offset, query, dialect, warnings).tokens()
    _check_parens(toks, offset, query)
    toks = _fold_date_ranges(toks, body, offset, query)
    return _Parser(toks, body, offset, query, dialect, number, known, warnings).parse()


def _check_parens(toks: List[Tok], offset: int, query: str) -> None:
    """Report unbalanced parentheses at the offending one before anything else."""
    stack: List[Tok] = []
    for t in toks:
        if t.kind == "LP":
            stack.append(t)
            if len(stack) > MAX_QUERY_DEPTH:
                raise QuerySyntaxError(f"parentheses nested more than {MAX_QUERY_DEPTH} deep", offset + t.pos, query)
        elif t.kind == "RP":
            if not stack:
                raise QuerySyntaxError("unbalanced parenthesis: ')' without a matching '('", offset + t.pos, query)
            stack.pop()
    if stack:
        raise QuerySyntaxError("unbalanced parenthesis: '(' is never closed", offset + stack[-1].pos, query)


def _fold_date_ranges(toks: List[Tok], body: str, offset: int, query: str) -> List[Tok]:
    """PubMed `2001:2005[dp]` lexes as WORD COLON WORD TAG, and `"2001"[dp] : "2005"[dp]` as
    QUOTED TAG COLON QUOTED TAG: fold both into one QUOTED "lo:hi" + TAG."""
    out: List[Tok] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        window = toks[i:i + 5]
        kinds = [w.kind for w in window]
        if kinds[:4] == ["WORD", "COLON", "WORD", "TAG"] or kinds[:4] == ["QUOTED", "COLON", "QUOTED", "TAG"]:
            out.append(Tok("QUOTED", f"{window[0].value}:{window[2].value}", t.pos, window[2].end))
            out.append(window[3])
            i += 4
            continue
        if kinds == ["QUOTED", "TAG", "COLON", "QUOTED", "TAG"] or kinds == ["WORD", "TAG", "COLON", "WORD", "TAG"]:
            out.append(Tok("QUOTED", f"{window[0].value}:{window[3].value}", t.pos, window[3].end))
            out.append(window[4])
            i += 5
            continue
        if t.kind == "COLON":
            out.append(Tok("WORD", ":", t.pos, t.end))  # a stray colon is just punctuation
        else:
            out.append(t)
        i += 1
    return out
