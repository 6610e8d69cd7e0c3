"""The syntax tree of a parsed search (`deepretrieval.search.query` builds it) and the
functions that walk it.

- Field constants: the searchable text fields of the local index (`TITLE`, `ABSTRACT`, ...),
  `FieldSpec` (where a term is searched), the PubMed field tags (`PUBMED_TAGS`), the Ovid field
  codes (`OVID_CODES`) and subheading codes (`OVID_SUBHEADINGS`) they map to.
- Nodes: `Text`, `Heading`, `DateRange`, `Absent`, `Ref` (a line reference), `And`, `Or`, `Not`,
  `Near`, `Limit`; every node knows its `depth`. `Query` is a parsed search: the final line's
  tree plus the earlier lines it references.
- Walks: `to_string` (a canonical rendering), `children`, `expanded_depth`, `expanded_size`,
  `referenced_lines`. The budgets of `deepretrieval.search.query` keep trees shallow enough for
  the recursive ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

# ----------------------------------------------------------------------------- fields

# Searchable text fields of the local index.
TITLE, ABSTRACT, MESH_TEXT, KEYWORDS, CONDITIONS, INTERVENTIONS, ELIGIBILITY = (
    "title", "abstract", "mesh", "keywords", "conditions", "interventions", "eligibility")
ALL_FIELDS = (TITLE, ABSTRACT, MESH_TEXT, KEYWORDS, CONDITIONS, INTERVENTIONS, ELIGIBILITY)
TEXT_WORD_FIELDS = (TITLE, ABSTRACT, MESH_TEXT, KEYWORDS, CONDITIONS, INTERVENTIONS)
TIAB = (TITLE, ABSTRACT)


@dataclass(frozen=True)
class FieldSpec:
    """Where a term is searched. kind: text (in `fields`), mesh, majr, sh, pt, id, date, absent."""

    kind: str
    fields: Tuple[str, ...] = ()
    name: str = ""  # the tag as written, for messages
    slop: Optional[int] = None  # [tiab:~N]


def _text(*fields: str) -> FieldSpec:
    return FieldSpec("text", tuple(fields))


PUBMED_TAGS: Dict[str, FieldSpec] = {}
for _names, _spec in [
    (("tiab", "title/abstract"), _text(*TIAB)),
    (("ti", "title"), _text(TITLE)),
    (("ab", "abstract"), _text(ABSTRACT)),
    (("tw", "text word", "text words"), _text(*TEXT_WORD_FIELDS)),
    (("all", "all fields", "all field"), _text(*ALL_FIELDS)),
    (("ot", "other term", "other terms", "kw", "keyword", "keywords"), _text(KEYWORDS)),
    (("mh", "mesh", "mesh terms", "mesh term", "mh:noexp", "mesh:noexp", "mesh terms:noexp"), FieldSpec("mesh")),
    (("majr", "mesh major topic", "majr:noexp", "mesh major topic:noexp"), FieldSpec("majr")),
    (("sh", "subheading", "mesh subheading", "sh:noexp"), FieldSpec("sh")),
    (("pt", "publication type", "ptyp"), FieldSpec("pt")),
    (("pmid", "uid"), FieldSpec("id")),
    (("dp", "pdat", "date - publication", "publication date"), FieldSpec("date")),
]:
    for _n in _names:
        PUBMED_TAGS[_n] = replace(_spec, name=_n)
# Real PubMed tags for data a local index does not hold: they match nothing (with a warning).
for _n in ("au", "author", "1au", "lastau", "fau", "full author name", "auid", "cn", "ir",
           "la", "lang", "language", "nm", "supplementary concept", "rn", "ec/rn number",
           "ta", "journal", "jour", "ad", "affiliation", "edat", "crdt", "mhda", "lr", "dcom",
           "date - entry", "date - create", "sb", "subset", "filter", "gr", "is", "vi", "ip",
           "pg", "si", "ps", "pa", "pl", "book", "cois", "tt", "jid", "aid", "lid", "mhda"):
    PUBMED_TAGS[_n] = FieldSpec("absent", name=_n)

OVID_CODES: Dict[str, FieldSpec] = {
    "ti": _text(TITLE), "ot": _text(TITLE), "ab": _text(ABSTRACT), "tw": _text(*TIAB),
    "mp": _text(*ALL_FIELDS), "hw": _text(MESH_TEXT), "kw": _text(KEYWORDS), "kf": _text(KEYWORDS),
    "sh": FieldSpec("mesh"), "fs": FieldSpec("sh"), "pt": FieldSpec("pt"), "ui": FieldSpec("id"),
    "yr": FieldSpec("date"), "dp": FieldSpec("date"),
}
for _c in ("au", "rn", "nm", "ed", "jn", "jw", "lg", "in", "ps", "ja", "so", "dc", "ep", "ez", "da",
           "cm", "gs", "ox", "px", "rx", "sb", "sa", "st", "fa", "is", "vo", "ip", "pg", "id", "es"):
    OVID_CODES.setdefault(_c, FieldSpec("absent", name=_c))
OVID_CODES = {k: replace(v, name=k) for k, v in OVID_CODES.items()}

# Ovid 2-letter subheading codes -> MeSH qualifier names.
OVID_SUBHEADINGS = {
    "ab": "abnormalities", "ad": "administration & dosage", "ae": "adverse effects",
    "ag": "agonists", "ah": "anatomy & histology", "ai": "antagonists & inhibitors",
    "an": "analysis", "bi": "biosynthesis", "bl": "blood", "bs": "blood supply",
    "cf": "cerebrospinal fluid", "ch": "chemistry", "ci": "chemically induced",
    "cl": "classification", "co": "complications", "cn": "congenital", "cs": "chemical synthesis",
    "cy": "cytology", "de": "drug effects", "df": "deficiency", "di": "diagnosis",
    "dg": "diagnostic imaging", "dh": "diet therapy", "dt": "drug therapy", "du": "diagnostic use",
    "ec": "economics", "ed": "education", "em": "embryology", "en": "enzymology",
    "ep": "epidemiology", "es": "ethics", "et": "etiology", "ge": "genetics", "gd": "growth & development",
    "hi": "history", "im": "immunology", "in": "injuries", "ir": "innervation", "is": "isolation & purification",
    "lj": "legislation & jurisprudence", "ma": "manpower", "me": "metabolism", "mi": "microbiology",
    "mo": "mortality", "nu": "nursing", "og": "organization & administration", "pa": "pathology",
    "pc": "prevention & control", "pd": "pharmacology", "pe": "pharmacokinetics", "ph": "physiology",
    "pk": "pharmacokinetics", "po": "poisoning", "pp": "physiopathology", "ps": "parasitology",
    "px": "psychology", "py": "pathogenicity", "ra": "radiography", "rh": "rehabilitation",
    "ri": "radionuclide imaging", "rt": "radiotherapy", "se": "secretion", "sn": "statistics & numerical data",
    "su": "surgery", "th": "therapy", "tm": "transmission", "tr": "transplantation", "tu": "therapeutic use",
    "ul": "ultrastructure", "ur": "urine", "us": "ultrasonography", "ut": "utilization", "vi": "virology",
    "ve": "veterinary", "ip": "isolation & purification",
}

# ----------------------------------------------------------------------------- tree


@dataclass(frozen=True)
class Node:
    """`depth`: levels of the tree under (and including) this node, computed on construction
    from the children (a `Ref` counts 1: see `expanded_depth`)."""

    pos: int
    depth: int = field(default=1, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        kids = children(self)
        if kids:
            object.__setattr__(self, "depth", 1 + max(c.depth for c in kids))


@dataclass(frozen=True)
class Text(Node):
    """Words or a phrase, possibly with wildcards, searched in `spec` (None = all fields)."""

    text: str
    spec: Optional[FieldSpec] = None
    phrase: bool = False


@dataclass(frozen=True)
class Heading(Node):
    """An exact MeSH heading (kind mesh|majr), publication type (pt), subheading (sh) or id."""

    kind: str
    name: str
    qualifiers: Tuple[str, ...] = ()
    explode: bool = False
    wildcard: bool = False


@dataclass(frozen=True)
class DateRange(Node):
    lo: int  # yyyymmdd inclusive
    hi: int


@dataclass(frozen=True)
class Absent(Node):
    """A search in a field the local index does not hold: matches nothing."""

    field_name: str
    text: str


@dataclass(frozen=True)
class Ref(Node):
    line: int


@dataclass(frozen=True)
class And(Node):
    items: Tuple[Node, ...]


@dataclass(frozen=True)
class Or(Node):
    items: Tuple[Node, ...]


@dataclass(frozen=True)
class Not(Node):
    """`positive` without `negative`."""

    positive: Node
    negative: Node


@dataclass(frozen=True)
class Near(Node):
    """Proximity (Ovid adjN): the operands within `distance` words (`ordered`: in order)."""

    left: Node
    right: Node
    distance: int
    ordered: bool


@dataclass(frozen=True)
class Limit(Node):
    """Ovid `limit N to X`; `date` set for yr= limits, otherwise `what` is not evaluable."""

    child: Node
    what: str
    date: Optional[DateRange] = None


@dataclass
class Query:
    """A parsed search: the final line's tree plus the earlier lines it may reference."""

    text: str
    root: Node
    lines: Dict[int, Node] = field(default_factory=dict)
    dialect: str = "pubmed"
    warnings: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        """The final line with references inlined; when inlining would blow up (lines that
        reuse each other), the lines that are referenced are listed instead."""
        budget = [20_000]
        try:
            return to_string(self.root, self.lines, budget)
        except _TooLong:
            used = referenced_lines(self)
            return "; ".join([f"#{n}: {to_string(self.lines[n])}" for n in used] + [to_string(self.root)])


class _TooLong(Exception):
    pass


def to_string(node: Node, lines: Optional[Dict[int, Node]] = None, budget: Optional[List[int]] = None) -> str:
    """A canonical, fully parenthesised rendering (references inlined when `lines` given)."""
    if budget is not None:
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooLong
    if lines is not None and budget is None:
        budget = [10 ** 9]
    if isinstance(node, Text):
        where = f"[{','.join(node.spec.fields) if node.spec else 'all'}]"
        return (f'"{node.text}"' if node.phrase else node.text) + where
    if isinstance(node, Heading):
        q = "/" + ",".join(node.qualifiers) if node.qualifiers else ""
        return f'"{node.name}{q}"[{node.kind}{":exp" if node.explode else ""}]'
    if isinstance(node, DateRange):
        return f"{node.lo}:{node.hi}[dp]"
    if isinstance(node, Absent):
        return f'"{node.text}"[{node.field_name}:absent]'
    if isinstance(node, Ref):
        return to_string(lines[node.line], lines, budget) if lines and node.line in lines else f"#{node.line}"
    if isinstance(node, (And, Or)):
        op = " AND " if isinstance(node, And) else " OR "
        return "(" + op.join(to_string(i, lines, budget) for i in node.items) + ")"
    if isinstance(node, Not):
        return f"({to_string(node.positive, lines, budget)} NOT {to_string(node.negative, lines, budget)})"
    if isinstance(node, Near):
        return f"({to_string(node.left, lines, budget)} NEAR/{node.distance}{'' if not node.ordered else ':ordered'} {to_string(node.right, lines, budget)})"
    if isinstance(node, Limit):
        return f"LIMIT({to_string(node.child, lines, budget)}, {node.what})"
    raise TypeError(node)


def expanded_depth(node: Node, line_depths: Dict[int, int]) -> int:
    """Depth of `node`'s tree with each reference counted as the depth of its line (from
    `line_depths`; 1 when unknown). Iterative, linear in the number of nodes."""
    deepest = 0
    stack = [(node, 1)]
    while stack:
        current, level = stack.pop()
        if isinstance(current, Ref):
            deepest = max(deepest, level - 1 + line_depths.get(current.line, 1))
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children(current))
    return deepest


def expanded_size(q: Query) -> int:
    """Number of nodes of the final line's tree with every reference inlined (computed without
    inlining): the cost of executing it, since lines may reuse each other exponentially."""
    memo: Dict[int, int] = {}

    def size(node: Node) -> int:
        if isinstance(node, Ref):
            if node.line not in memo:
                memo[node.line] = size(q.lines[node.line])
            return memo[node.line]
        return 1 + sum(size(c) for c in children(node))

    return size(q.root)


def referenced_lines(q: Query) -> List[int]:
    """Line numbers the final line depends on (transitively), in ascending order."""
    seen: set = set()

    def walk(node: Node) -> None:
        if isinstance(node, Ref):
            if node.line not in seen:
                seen.add(node.line)
                walk(q.lines[node.line])
        for child in children(node):
            walk(child)

    walk(q.root)
    return sorted(seen)


def children(node: Node) -> Sequence[Node]:
    """The direct subtrees of `node` (none for leaves; a `Ref` is a leaf)."""
    if isinstance(node, (And, Or)):
        return node.items
    if isinstance(node, Not):
        return (node.positive, node.negative)
    if isinstance(node, Near):
        return (node.left, node.right)
    if isinstance(node, Limit):
        return (node.child,)
    return ()
