"""Local search engine: a tantivy index of PubMed-like records, searched with PubMed syntax.

Indexes are built by `deepretrieval.search.local_index`.

Searching (`LocalSearchEngine.search`) parses the query with `deepretrieval.search.query`
and builds the tantivy query from the syntax tree programmatically (user text never reaches
tantivy's own query parser):

- Boolean structure: AND -> Must, OR -> Should, ``A NOT B`` -> Must(A) + MustNot(B).
- Words are analysed with the same analyser as the index (tantivy "default": split on
  non-alphanumerics, drop tokens over 40 bytes, lower-case; no stemming, like PubMed).
  A word that analyses to several tokens (``c-reactive``) is a phrase, as in PubMed.
- Stopwords: a word of the index's stopword list (`text.STOPWORD_LISTS`: "pubmed" for a
  PubMed mirror, "none" for `index build`'s indexes unless told; the engine's `stopwords` overrides
  it) is ignored where it stands alone (``the``, ``of[tiab]``), with a warning, as PubMed does; inside
  a phrase or a proximity search it is kept. An OR of title words then reads far fewer postings.
- Combined field: in an index built with it (`local_index.ALL_TEXT_FIELD`, a PubMed mirror's default)
  an all-fields word (no field tag or [all], no wildcard, one token) is one term query on the combined text,
  ranked by its BM25 there; the match set is the same as searching every field.
- Truncation: the literal prefix is expanded against the index's term dictionary
  (`Searcher.terms_with_prefix`), keeping the `max_expansions` (default 600, PubMed's cap)
  most frequent variants; a warning says when the cap cut variants. Inside phrases and
  proximity searches wildcards become tantivy regex phrase queries.
- MeSH: ``[mh]`` / ``Heading/`` match the heading exactly (case-insensitive). There is no MeSH
  tree in a local index, so explosion (``exp``, PubMed's default) searches the heading alone,
  with a warning. ``[majr]``, subheadings and ``[pt]`` use the data when the corpus has it and
  fall back (majr -> mh, heading/qualifier -> heading) with a warning when it does not.
- Dates: ``[dp]`` ranges and the `min_date`/`max_date` filters use the integer ``pub_date``
  (yyyymmdd). Records without a date match searches without date conditions and are
  excluded by any date condition.
- Ranking: BM25 (tantivy's) over the documents the Boolean query matches; a term searched in
  several fields scores the sum of its per-field BM25; ties keep tantivy's order (segment,
  document). `total` counts every match when the caller asks (`count=True`), else it is None.
- Cost budget: while the tantivy query is built, the postings it will read are estimated from
  the index's document frequencies (`COST_*`: a positional posting of a phrase or proximity
  search costs more than a plain one, and every expanded term has a fixed cost); a query over
  `max_query_cost` (default `DEFAULT_MAX_QUERY_COST`, about 1-2 s on one core) is rejected with
  a `QuerySyntaxError` before anything runs. Proximity searches expand to at most
  `MAX_PROXIMITY_VARIANTS` phrase variants, checked before they are built. Any query the parser
  accepts is within `query.MAX_QUERY_DEPTH`, so compiling it never reaches the recursion limit.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import tantivy

from deepretrieval.search import query_tree as Q
from deepretrieval.search.base import QuerySyntaxError, SearchEngine, SearchResult, SearchUnavailable, check_k
from deepretrieval.search.ingest import parse_date
from deepretrieval.search.local_index import ALL_TEXT_FIELD, TEXT_FIELDS, make_analyzer, read_index_meta, shard_paths
from deepretrieval.search.query import parse
from deepretrieval.search.text import DEFAULT_STOPWORDS, STOPWORD_LISTS, check_stopwords

logger = logging.getLogger(__name__)

MAX_EXPANDED_NODES = 2_000  # tantivy copies a reused sub-query wherever it is referenced; CLEF max is 314
DEFAULT_MAX_EXPANSIONS = 600  # PubMed's documented cap on variants of a truncated term
MAX_PROXIMITY_VARIANTS = 2_000  # phrase variants one proximity (adjN) search may expand to
# Estimated cost of a query, in units of one posting read by a term query (measured on
# pubmed_mini: ~0.015-0.04 us per term posting, ~0.15-0.25 us per positional posting of a
# phrase / regex phrase, ~6 us per term query built for an expanded truncation).
COST_POSTING = 1
COST_POSITION_POSTING = 10
COST_TERM = 400
DEFAULT_MAX_QUERY_COST = 50_000_000


# ----------------------------------------------------------------------------- query building

# a truncation on a sharded index reads each shard's SHARD_EXPANSION_FACTOR x max_expansions most
# frequent variants (bounded work on a big mirror; the whole index's top variants are approximate)
SHARD_EXPANSION_FACTOR = 4


def _bm25_idf(doc_freq: int, num_docs: int) -> float:
    """tantivy's BM25 IDF (tantivy::query::bm25): ln(1 + (N - n + 0.5) / (n + 0.5))."""
    return math.log(1.0 + (num_docs - doc_freq + 0.5) / (doc_freq + 0.5))


_SENTINELS = {"*": "qqzstarqqz", "$": "qqzstarqqz", "?": "qqzoptqqz", "#": "qqzoneqqz"}
_SENTINEL_RE = re.compile(r"qqz(star|opt|one|lim(\d+))qqz")


class _Compiler:
    """Turns one parsed `Query` into a tantivy query for one engine (per call; not shared)."""

    def __init__(self, engine: "LocalSearchEngine", parsed: Q.Query, shard: Optional[int] = None):
        self.e, self.q, self.shard = engine, parsed, shard
        self.ovid = parsed.dialect == "ovid"
        self.warnings: List[str] = []
        self.stopped: Dict[str, None] = {}  # stopwords ignored, in order
        self.memo: Dict[Tuple[int, bool], Optional[tantivy.Query]] = {}
        self.cost = 0

    def charge(self, cost: int, pos: int) -> None:
        """Add to the estimated cost of the query; over the engine's budget: QuerySyntaxError."""
        self.cost += int(cost)
        if self.cost > self.e.max_query_cost:
            raise self.error(
                f"query too expensive for the local index: it would read more than {self.e.max_query_cost:,} "
                "postings (estimated from term frequencies); use fewer or more specific phrases and "
                "truncated terms (longer prefixes)", pos)

    def token_postings(self, field: str, tok: str) -> int:
        """Postings of an analysed token in `field`: its document frequency, or for a wildcard
        token the sum over every term its regex matches (what a regex phrase query reads)."""
        if not self.is_wild(tok):
            return self.e._doc_freq(field, tok)
        prefix = tok.split("\x00", 1)[0]
        pattern = None if re.fullmatch(r"[^\x00]*\x00\*", tok) else re.compile(self.to_regex(tok) + r"\Z")
        return self.e._prefix_postings(field, prefix, pattern)

    def term(self, field: str, value: str) -> tantivy.Query:
        return self.scored(tantivy.Query.term_query(self.e.schema, field, value), field, [value])

    def scored(self, query: tantivy.Query, field: str, terms: List[str]) -> tantivy.Query:
        """`query` (a term or phrase of `terms`) as it scores on the whole index: compiled for one
        shard of a sharded index, boosted by the ratio of the whole index's BM25 IDF (summed over
        `terms`, as tantivy does for phrases) to the shard's own, so every shard weighs the term
        alike; only the field-length normalisation stays the shard's."""
        if self.shard is None:
            return query
        ratio = self.e._idf_ratio(self.shard, field, terms)
        return query if ratio == 1.0 else tantivy.Query.boost_query(query, ratio)

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)

    def error(self, problem: str, pos: int) -> QuerySyntaxError:
        return QuerySyntaxError(problem, pos, self.q.text)

    # -- analysis
    def tokens(self, text: str, pos: int) -> List[str]:
        """Analyse like the index; wildcards survive as sentinels -> markers '*', '?', '#', '$N'."""
        protected = text
        if "$" in protected:
            limited = re.search(r"\$(\d{3,})", protected)
            if limited:  # Ovid limited truncation: $N allows up to N more characters
                raise self.error(f"limited truncation ${limited.group(1)[:12]} allows at most 99 characters", pos)
            protected = re.sub(r"\$(\d+)", lambda m: f"qqzlim{m.group(1)}qqz", protected)
        for ch, sentinel in _SENTINELS.items():
            if ch in ("?", "#") and not self.ovid:
                continue
            protected = protected.replace(ch, sentinel)
        out = []
        for tok in self.e.analyzer.analyze(protected):
            if "qqz" in tok:
                tok = _SENTINEL_RE.sub(lambda m: {"star": "\x00*", "opt": "\x00?", "one": "\x00#"}.get(
                    m.group(1), f"\x00${m.group(2)}\x00"), tok)
                if tok.startswith("\x00"):
                    raise self.error(f"wildcard needs a word before it in {text!r}", pos)
            out.append(tok)
        return out

    @staticmethod
    def is_wild(tok: str) -> bool:
        return "\x00" in tok

    @staticmethod
    def to_regex(tok: str) -> str:
        parts = re.split(r"\x00(\*|\?|#|\$\d+\x00)", tok)
        out = []
        for i, p in enumerate(parts):
            if i % 2 == 0:
                out.append(re.escape(p))
            elif p == "*":
                out.append(".*")
            elif p == "?":
                out.append(".?")
            elif p == "#":
                out.append(".")
            else:
                out.append(".{0,%d}" % int(p[1:-1]))
        return "".join(out)

    # -- leaves
    def expand(self, field: str, tok: str, pos: int) -> List[str]:
        prefix = tok.split("\x00", 1)[0]
        pattern = None if re.fullmatch(r"[^\x00]*\x00\*", tok) else re.compile(self.to_regex(tok) + r"\Z")
        terms, capped, postings = self.e._expand(field, prefix, pattern)
        self.charge(COST_TERM * len(terms) + COST_POSTING * postings, pos)
        if capped:
            self.warn(f"truncated term {prefix}* has more than {self.e.max_expansions} variants in {field}; "
                      f"the {self.e.max_expansions} most frequent were searched")
        return terms

    def term_in_field(self, field: str, toks: List[str], slop: int, pos: int) -> Optional[tantivy.Query]:
        schema = self.e.schema
        if len(toks) == 1:
            tok = toks[0]
            if not self.is_wild(tok):
                self.charge(COST_TERM + COST_POSTING * self.e._doc_freq(field, tok), pos)
                return self.term(field, tok)
            terms = self.expand(field, tok, pos)
            if not terms:
                return None
            if len(terms) == 1:
                return self.term(field, terms[0])
            return tantivy.Query.boolean_query([(tantivy.Occur.Should, self.term(field, t)) for t in terms])
        self.charge(COST_TERM * len(toks), pos)
        for tok in toks:  # token by token: an expensive phrase stops at the first token over budget
            self.charge(COST_POSITION_POSTING * self.token_postings(field, tok), pos)
        if any(self.is_wild(t) for t in toks):
            return tantivy.Query.regex_phrase_query(schema, field, [self.to_regex(t) for t in toks], slop)
        return self.scored(tantivy.Query.phrase_query(schema, field, toks, slop), field, toks)

    def text(self, node: Q.Text) -> Optional[tantivy.Query]:
        toks = self.tokens(node.text, node.pos)
        if len(toks) == 1 and toks[0] in self.e.stopwords:
            self.stopped.setdefault(toks[0], None)
            return None
        every_field = node.spec is None or node.spec.fields == Q.ALL_FIELDS  # no tag, [all], .mp.
        if every_field and self.e.all_field and len(toks) == 1 and not self.is_wild(toks[0]):
            return self.term_in_field(ALL_TEXT_FIELD, toks, 0, node.pos)
        fields = node.spec.fields if node.spec is not None else Q.ALL_FIELDS
        # fields no record of this index fills cannot match: skipping them keeps queries fast
        fields = tuple(f for f in fields if f in self.e.text_fields)
        slop = node.spec.slop if node.spec is not None and node.spec.slop is not None else 0
        if not toks:
            self.warn(f"{node.text!r} has no searchable characters and was ignored")
            return None
        parts = [q for q in (self.term_in_field(f, toks, slop, node.pos) for f in fields) if q is not None]
        if not parts:
            return tantivy.Query.empty_query()
        if len(parts) == 1:
            return parts[0]
        # BM25 summed over the fields (Lucene's "most fields"); measured 2x faster than a
        # disjunction-max here, with the same match set
        return tantivy.Query.boolean_query([(tantivy.Occur.Should, p) for p in parts])

    def keyword(self, field: str, value: str, wildcard: bool = False, pos: int = 0) -> tantivy.Query:
        value = re.sub(r"\s+", " ", value.strip().lower())
        if wildcard:
            terms, capped, postings = self.e._expand(field, value, None)
            self.charge(COST_TERM * len(terms) + COST_POSTING * postings, pos)
            if capped:
                self.warn(f"{value}* matched more than {self.e.max_expansions} headings; "
                          f"the {self.e.max_expansions} most frequent were searched")
            if not terms:
                return tantivy.Query.empty_query()
            return tantivy.Query.boolean_query([(tantivy.Occur.Should, self.term(field, t)) for t in terms])
        self.charge(COST_TERM + COST_POSTING * self.e._doc_freq(field, value), pos)
        return self.term(field, value)

    def heading(self, node: Q.Heading) -> tantivy.Query:
        meta = self.e.meta
        if node.kind == "id":
            uid = node.name.strip()
            return self.scored(tantivy.Query.term_query(self.e.schema, "id", uid), "id", [uid])
        if node.kind == "pt":
            if not meta.get("has_pt", True):
                self.warn("this index has no publication types: [pt] matches nothing")
            return self.keyword("pt_kw", node.name, node.wildcard, node.pos)
        if node.kind in ("mesh", "majr") and not meta.get("has_mesh", True):
            self.warn("this index has no MeSH headings: MeSH searches match nothing")
        if node.kind == "sh":
            name = Q.OVID_SUBHEADINGS.get(node.name.lower(), node.name)
            if not meta.get("has_qualifiers"):
                self.warn("this index has no MeSH subheadings: [sh] matches nothing")
            return self.keyword("sh_kw", name, node.wildcard, node.pos)
        if node.explode:
            self.warn(f"MeSH explosion is not available locally (no MeSH tree): exp {node.name} "
                      "searches that heading only")
        kind = node.kind
        if kind == "majr" and not meta.get("has_major"):
            self.warn("this index has no major-topic data: [majr] / *Heading searched as [mh]")
            kind = "mesh"
        field = "majr_kw" if kind == "majr" else "mesh_kw"
        base = self.keyword(field, node.name, node.wildcard, node.pos)
        if not node.qualifiers:
            return base
        if not meta.get("has_qualifiers"):
            self.warn("this index has no MeSH subheadings: Heading/subheading searched as the heading")
            return base
        quals = [self.term("qual_kw", f"{node.name.lower()}/{q}") for q in node.qualifiers]
        return quals[0] if len(quals) == 1 else tantivy.Query.boolean_query(
            [(tantivy.Occur.Should, q) for q in quals])

    def date(self, node: Q.DateRange) -> tantivy.Query:
        return self.e._date_query(node.lo, node.hi)

    # -- proximity
    def near_alternatives(self, node: Q.Node) -> List[List[str]]:
        if isinstance(node, Q.Text):
            toks = self.tokens(node.text, node.pos)
            return [toks] if toks else []
        if isinstance(node, Q.Or):
            alts = []
            for item in node.items:
                alts += self.near_alternatives(item)
                self.check_variants(len(alts), node.pos)
            return alts
        if isinstance(node, Q.Near):
            left, right = self.near_alternatives(node.left), self.near_alternatives(node.right)
            self.check_variants(len(left) * len(right) * (1 if node.ordered else 2), node.pos)
            out = [l + r for l in left for r in right]
            if not node.ordered:
                out += [r + l for l in left for r in right]
            return out
        raise self.error("only words, phrases and OR-groups can stand inside a proximity (adj) search", node.pos)

    def check_variants(self, n: int, pos: int) -> None:
        """Proximity searches expand to phrase variants (nested adjN multiply them): bounded
        before they are built, so a chain of adjN costs linear time, not exponential."""
        if n > MAX_PROXIMITY_VARIANTS:
            raise self.error(f"proximity search expands to more than {MAX_PROXIMITY_VARIANTS} phrase variants "
                             f"({n} or more)", pos)

    def near_fields(self, node: Q.Node) -> Tuple[str, ...]:
        if isinstance(node, Q.Text):
            fields = node.spec.fields if node.spec is not None else Q.ALL_FIELDS
            return tuple(f for f in fields if f in self.e.text_fields)
        fields: List[str] = []
        for child in Q.children(node):
            fields += [f for f in self.near_fields(child) if f not in fields]
        return tuple(fields)

    def near(self, node: Q.Near) -> Optional[tantivy.Query]:
        """Proximity as regex phrase queries with slop; single-word alternatives on one side
        are merged into one alternation regex so `(a or b or c) adj5 (x or y)` is a handful of
        phrase queries, not the cross product. Unordered (adjN) adds the reversed order."""
        left, right = self.near_alternatives(node.left), self.near_alternatives(node.right)
        if not left or not right:
            return None
        left_r, right_r = self._merge_alternatives(left), self._merge_alternatives(right)
        factor = 1 if node.ordered else 2
        self.check_variants(len(left_r) * len(right_r) * factor, node.pos)
        seqs = [l + r for l in left_r for r in right_r]
        if not node.ordered:
            seqs += [r + l for l in left_r for r in right_r]
        fields = self.near_fields(node)
        for field in fields:
            # every variant reads the positions of all its tokens (merged single words: all of
            # them), so each alternative on one side is read once per variant of the other side;
            # charged token by token, so an expensive query stops at the first token over budget
            self.charge(COST_TERM * len(seqs), node.pos)
            for alts, times in ((left, factor * len(right_r)), (right, factor * len(left_r))):
                for alt in alts:
                    for tok in alt:
                        self.charge(COST_POSITION_POSTING * times * self.token_postings(field, tok), node.pos)
        clauses = []
        for field in fields:
            for seq in dict.fromkeys(tuple(s) for s in seqs):
                slop = node.distance + max(0, len(seq) - 2)
                clauses.append((tantivy.Occur.Should,
                                tantivy.Query.regex_phrase_query(self.e.schema, field, list(seq), slop)))
        return tantivy.Query.boolean_query(clauses) if clauses else tantivy.Query.empty_query()

    def _merge_alternatives(self, alts: List[List[str]]) -> List[List[str]]:
        singles = [self.to_regex(a[0]) for a in alts if len(a) == 1]
        out = [[self.to_regex(t) for t in a] for a in alts if len(a) > 1]
        if singles:
            singles = list(dict.fromkeys(singles))
            out.insert(0, [singles[0] if len(singles) == 1 else "(?:" + "|".join(singles) + ")"])
        return out

    def limit_restriction(self, what: str) -> Optional[tantivy.Query]:
        """Ovid limits the local index can evaluate: humans / animals (check tags in MeSH)."""
        what = what.strip().strip('"').lower()
        if what in ("humans", "human", "animals", "animal"):
            return self.keyword("mesh_kw", "humans" if what.startswith("human") else "animals")
        return None

    # -- structure
    def compile(self, node: Q.Node, negated: bool = False) -> Optional[tantivy.Query]:
        """`negated` is true under an odd number of NOTs (only limits care: see Limit)."""
        if isinstance(node, Q.Text):
            return self.text(node)
        if isinstance(node, Q.Heading):
            return self.heading(node)
        if isinstance(node, Q.DateRange):
            return self.date(node)
        if isinstance(node, Q.Absent):
            self.warn(f"field [{node.field_name}] is not in the local index: {node.text!r} matches nothing")
            return tantivy.Query.empty_query()
        if isinstance(node, Q.Ref):
            key = (node.line, negated)
            if key not in self.memo:
                self.memo[key] = self.compile(self.q.lines[node.line], negated)
            return self.memo[key]
        if isinstance(node, (Q.And, Q.Or)):
            occur = tantivy.Occur.Must if isinstance(node, Q.And) else tantivy.Occur.Should
            parts = [p for p in (self.compile(i, negated) for i in node.items) if p is not None]
            if not parts:
                return None
            return parts[0] if len(parts) == 1 else tantivy.Query.boolean_query([(occur, p) for p in parts])
        if isinstance(node, Q.Not):
            pos, neg = self.compile(node.positive, negated), self.compile(node.negative, not negated)
            if pos is None:
                # the left side vanished (no searchable text): NOT alone means everything but B
                pos = tantivy.Query.all_query()
            if neg is None:
                return pos
            return tantivy.Query.boolean_query([(tantivy.Occur.Must, pos), (tantivy.Occur.MustNot, neg)])
        if isinstance(node, Q.Near):
            return self.near(node)
        if isinstance(node, Q.Limit):
            child = self.compile(node.child, negated)
            restriction = self.date(node.date) if node.date is not None else self.limit_restriction(node.what)
            if restriction is None:
                # Unknown subset of the child: keep recall - the whole child where the limit
                # restricts results, nothing where the limited set is subtracted (NOT).
                self.warn(f"limit to {node.what} cannot be evaluated on the local index: "
                          + ("matches nothing (it is subtracted)" if negated else "ignored"))
                return tantivy.Query.empty_query() if negated else child
            date = restriction
            if child is None:
                return date
            return tantivy.Query.boolean_query([(tantivy.Occur.Must, child), (tantivy.Occur.Must, date)])
        raise TypeError(f"unknown node {node!r}")


# ----------------------------------------------------------------------------- engine

class LocalSearchEngine(SearchEngine):
    """Search a tantivy index built by `build_index` with PubMed query syntax.

    Cheap to construct (opens the index, reads the metadata) and safe to share between
    threads: searches use immutable searchers; the truncation-expansion cache is locked.
    Filters: `min_date` / `max_date` ("YYYY[/MM[/DD]]"): records without a date are excluded
    when either is given.

    A sharded index (`build_index(..., shards=N)`) opens transparently: the query is compiled
    once against the shards' combined term statistics (document frequencies summed, truncations
    expanded over the union of the shards' terms, so the Boolean match set is the single index's)
    and run on every shard concurrently (`search_threads`, default one per shard; tantivy releases
    the GIL while it searches); the shards' top k are merged by score, ties by (shard, segment,
    document), the order tantivy itself uses within one index. BM25 statistics: tantivy-py has no
    hook for global ones, so with `global_idf` (default) the query is compiled once per shard with
    every term and phrase boosted by (whole-index IDF / shard IDF), which gives each shard the
    whole index's IDF; the average field length stays the shard's (and regex phrases, i.e.
    wildcards inside phrases or proximity searches, keep the shard's IDF), so ranked scores can
    differ slightly from the single index's: docs/benchmarks.md "Sharded search" measures it."""

    name = "local"

    def __init__(self, index_dir: Union[str, os.PathLike], max_expansions: int = DEFAULT_MAX_EXPANSIONS,
                 expansion_cache_size: int = 50_000, max_query_cost: int = DEFAULT_MAX_QUERY_COST,
                 search_threads: Optional[int] = None, global_idf: bool = True, stopwords: Optional[str] = None,
                 **_ignored: Any):
        self.index_dir = Path(index_dir)
        self.meta: Dict[str, Any] = read_index_meta(self.index_dir)
        self.stopword_list = check_stopwords(stopwords or self.meta.get("stopwords", DEFAULT_STOPWORDS))
        self.stopwords = STOPWORD_LISTS[self.stopword_list]
        self.searchers = []
        for path in shard_paths(self.index_dir, self.meta):
            try:
                index = tantivy.Index.open(str(path))
            except Exception as exc:  # tantivy raises ValueError/OSError on damaged indexes
                raise SearchUnavailable(f"cannot open index {path}: {exc}") from exc
            if not self.searchers:
                self.schema = index.schema
            self.searchers.append(index.searcher())
        self.searcher = self.searchers[0]
        self.text_fields = frozenset(self.meta.get("text_fields", TEXT_FIELDS))
        self.all_field = bool(self.meta.get("all_field", False))  # all-fields words in ALL_TEXT_FIELD
        self.search_threads = len(self.searchers) if search_threads is None else max(1, int(search_threads))
        self.global_idf = bool(global_idf)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_pid = 0
        self._local = threading.local()  # one analyser per thread (pyo3 objects may borrow mutably)
        self.max_expansions = int(max_expansions)
        self.max_query_cost = int(max_query_cost)
        self._cache: Dict[Tuple[str, str, Optional[str]], Any] = {}
        self._cache_size = expansion_cache_size
        self._lock = threading.Lock()
        if _ignored:
            logger.debug("LocalSearchEngine ignores options %s", sorted(_ignored))

    @property
    def analyzer(self) -> tantivy.TextAnalyzer:
        analyzer = getattr(self._local, "analyzer", None)
        if analyzer is None:
            analyzer = self._local.analyzer = make_analyzer()
        return analyzer

    @property
    def num_docs(self) -> int:
        return sum(searcher.num_docs for searcher in self.searchers)

    @property
    def num_shards(self) -> int:
        return len(self.searchers)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _cached(self, key: Tuple[str, str, Optional[str]], compute: Any) -> Any:
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        value = compute()
        with self._lock:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = value
        return value

    def _expand(self, field: str, prefix: str, pattern: Optional["re.Pattern[str]"]) -> Tuple[List[str], bool, int]:
        """The `max_expansions` most frequent terms of `field` with `prefix` (matching `pattern`),
        whether the cap cut some, and the postings of the kept terms (sum of document frequencies)."""

        def compute() -> Tuple[List[str], bool, int]:
            if len(self.searchers) > 1 and pattern is None:
                found = self._shard_terms(field, prefix, SHARD_EXPANSION_FACTOR * self.max_expansions + 1)
            elif len(self.searchers) > 1:
                found = [(t, c) for t, c in self._shard_terms(field, prefix) if pattern.match(t)]
            elif pattern is None:
                found = self.searcher.terms_with_prefix(field, prefix, limit=self.max_expansions + 1)
            else:
                found = [(t, c) for t, c in self.searcher.terms_with_prefix(field, prefix) if pattern.match(t)]
            kept = found[: self.max_expansions]  # sorted by document frequency
            return [t for t, _ in kept], len(found) > self.max_expansions, sum(int(c) for _, c in kept)

        return self._cached((field, prefix, pattern.pattern if pattern is not None else None), compute)

    def _prefix_postings(self, field: str, prefix: str, pattern: Optional["re.Pattern[str]"]) -> int:
        """Postings of every term of `field` with `prefix` (matching `pattern`): no cap, as a
        regex phrase query reads them all."""

        def compute() -> int:
            return sum(int(c) for searcher in self.searchers for t, c in searcher.terms_with_prefix(field, prefix)
                       if pattern is None or pattern.match(t))

        return self._cached(("postings:" + field, prefix, pattern.pattern if pattern is not None else None), compute)

    def _shard_terms(self, field: str, prefix: str, limit: Optional[int] = None) -> List[Tuple[str, int]]:
        """The terms of `field` with `prefix` over all shards, with their summed document frequency,
        most frequent first (ties: term order, as tantivy lists the terms of one index). `limit`:
        only each shard's `limit` most frequent terms are read, so the result is bounded by
        shards x `limit` and the top variants (and their frequencies) are approximate: a term
        frequent overall but outside a shard's top `limit` misses that shard's count."""
        counts: Dict[str, int] = {}
        for searcher in self.searchers:
            terms = searcher.terms_with_prefix(field, prefix) if limit is None \
                else searcher.terms_with_prefix(field, prefix, limit=limit)
            for term, count in terms:
                counts[term] = counts.get(term, 0) + int(count)
        return sorted(counts.items(), key=lambda tc: (-tc[1], tc[0]))

    def _doc_freq(self, field: str, term: str) -> int:
        if len(self.searchers) == 1:
            return int(self.searcher.doc_freq(field, term))
        return self._cached(("df:" + field, term, None),
                            lambda: sum(int(searcher.doc_freq(field, term)) for searcher in self.searchers))

    def _idf_ratio(self, shard: int, field: str, terms: List[str]) -> float:
        """Whole-index BM25 IDF of `terms` (summed) over shard `shard`'s; tantivy's IDF is
        ln(1 + (N - n + 0.5) / (n + 0.5)) for N documents, n of them with the term.

        An approximation when documents were deleted (a mirror's revised or deleted PMIDs) and
        not yet merged away: tantivy counts them in n and in its N (max_doc), but tantivy-py
        exposes only the live count (`num_docs`), so N here is the live count and n is clamped
        to it (else the IDF, and the boost, could turn negative); see docs/benchmarks.md."""
        searcher = self.searchers[shard]
        n_whole, n_own = self.num_docs, int(searcher.num_docs)
        whole = sum(_bm25_idf(min(self._doc_freq(field, t), n_whole), n_whole) for t in terms)
        own = sum(_bm25_idf(min(int(searcher.doc_freq(field, t)), n_own), n_own) for t in terms)
        return whole / own if own > 0 else 1.0

    def _date_query(self, lo: Optional[int], hi: Optional[int]) -> tantivy.Query:
        return tantivy.Query.range_query(self.schema, "pub_date", tantivy.FieldType.Integer, lo, hi)

    def compile(self, query: str, shard: Optional[int] = None) -> Tuple[tantivy.Query, Q.Query, List[str]]:
        """Parse and build the tantivy query; returns (query, parsed tree, warnings). `shard`: the
        query for that shard of a sharded index, scored with the whole index's IDF (see
        `_Compiler.scored`); None: scored with each index's own statistics.

        Every failure is a QuerySyntaxError: the parser's budgets, the expanded size, the cost
        budget, and (defensively) tantivy rejecting a query it was given or a recursion limit."""
        parsed = parse(query)
        size = Q.expanded_size(parsed)
        if size > MAX_EXPANDED_NODES:
            raise QuerySyntaxError(
                f"query too complex: its line references expand to {size} clauses (limit {MAX_EXPANDED_NODES})",
                0, query)
        comp = _Compiler(self, parsed, shard)
        try:
            tq = comp.compile(parsed.root)
        except RecursionError as exc:  # the parser bounds depth; this only guards against its own bugs
            raise QuerySyntaxError(f"query nested too deeply for the local engine ({exc})", 0, query) from exc
        except (ValueError, OverflowError, re.error) as exc:
            if isinstance(exc, QuerySyntaxError):
                raise
            # tantivy (or a regular expression) refusing a query it was given
            raise QuerySyntaxError(f"query not accepted by the local index ({exc})", 0, query) from exc
        warnings = list(parsed.warnings) + comp.warnings
        if comp.stopped:
            warnings.append(f"stopwords ignored ({self.stopword_list} list): {', '.join(comp.stopped)}")
        if tq is None:
            warnings.append("the query has no searchable terms")
            tq = tantivy.Query.empty_query()
        return tq, parsed, warnings

    def search(self, query: str, k: int = 100, min_date: Optional[str] = None, max_date: Optional[str] = None,
               count: bool = False, **filters: Any) -> SearchResult:
        """The top `k` matches, best first. `count=True` also counts every match into `total`;
        otherwise `total` is None ("not counted"). The ids and scores are the same either way.
        (tantivy-py 0.27 scores every match in both cases: it collects through a MultiCollector,
        which never prunes, so not counting saves only the counter; see docs/benchmarks.md.)"""
        start = time.perf_counter()
        if len(self.searchers) > 1 and self.global_idf:
            compiled = [self.compile(query, shard) for shard in range(len(self.searchers))]
            queries, (_, parsed, warnings) = [c[0] for c in compiled], compiled[0]
        else:
            tq, parsed, warnings = self.compile(query)
            queries = [tq] * len(self.searchers)
        if filters:
            warnings.append(f"filters not supported by the local engine were ignored: {', '.join(sorted(filters))}")
        if min_date or max_date:
            lo = parse_date(min_date) if min_date else None
            hi = parse_date(max_date, end=True) if max_date else None
            if (min_date and lo is None) or (max_date and hi is None):
                raise ValueError(f"invalid date filter min_date={min_date!r} max_date={max_date!r} (use YYYY/MM/DD)")
            date = self._date_query(lo, hi)
            queries = [tantivy.Query.boolean_query([(tantivy.Occur.Must, q), (tantivy.Occur.Must, date)]) for q in queries]
        k = check_k(k)
        try:
            hits, total = self._top(queries, max(k, 1), bool(count))
        except ValueError as exc:  # e.g. a regex phrase with too many expansions
            raise QuerySyntaxError(f"query too broad for the local index ({exc})", 0, query) from exc
        hits = hits[:k]
        ids = [self.searchers[shard].doc(addr)["id"][0] for _, shard, addr in hits]
        scores = [score for score, _, _ in hits]
        return SearchResult(
            ids=ids, total=total, scores=scores, query=query, engine=self.name, k=k,
            warnings=warnings, query_translation=str(parsed), elapsed_s=time.perf_counter() - start,
        )

    def _top(self, queries: List[tantivy.Query], limit: int,
             count: bool) -> Tuple[List[Tuple[float, int, Any]], Optional[int]]:
        """The best `limit` hits of `queries` (one per shard) as (score, shard, address), best
        first, and the match count (None unless `count`). Shards are searched concurrently and their
        hits merged by score, ties by (shard, segment, document)."""
        if len(self.searchers) == 1:
            res = self.searcher.search(queries[0], limit=limit, count=count)
            return [(float(s), 0, addr) for s, addr in res.hits], (int(res.count) if count else None)
        pool = self._shard_pool()
        results = list(pool.map(lambda sq: sq[0].search(sq[1], limit=limit, count=count), zip(self.searchers, queries)))
        hits = sorted(((float(s), shard, addr) for shard, res in enumerate(results) for s, addr in res.hits),
                      key=lambda h: (-h[0], h[1], h[2].segment_ord, h[2].doc))
        return hits[:limit], (sum(int(res.count) for res in results) if count else None)

    def _shard_pool(self) -> ThreadPoolExecutor:
        """The shard-search threads, made on first use and again in a forked child (a fork copies
        the pool but not its threads, so the inherited one would never run a task)."""
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(max_workers=self.search_threads, thread_name_prefix="shard-search")
                self._pool_pid = os.getpid()
            return self._pool

    def count(self, query: str, **filters: Any) -> int:
        """The number of documents `query` matches."""
        return self.search(query, k=0, count=True, **filters).total
