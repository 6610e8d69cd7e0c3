"""The contract every search engine honours, local or remote.

An engine answers `search(query, k, **filters) -> SearchResult` and *raises* a classified
`SearchEngineError` when it cannot: `QuerySyntaxError` is the query writer's fault (the reward
penalises it), `SearchUnavailable` is the service's fault (the trainer leaves the sample out).
`try_search` turns those errors into a `SearchResult` whose `error` is filled, for callers such
as the CLI that want one JSON shape for success and failure.

Filters shared by the engines (each engine documents which it honours):
`min_date` / `max_date` ("YYYY/MM/DD", "YYYY/MM" or "YYYY"; publication date for PubMed
records, first-posted date for trials).
"""

from __future__ import annotations

import importlib
import operator
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence


class SearchEngineError(Exception):
    """Base class of classified search errors; `kind` is the error class counted in metrics."""

    kind = "search_error"

    def to_dict(self) -> Dict[str, str]:
        return {"type": self.kind, "message": str(self)}


class QuerySyntaxError(SearchEngineError, ValueError):
    """The query cannot be parsed. `position` is the 0-based character offset of the problem."""

    kind = "query_syntax"

    def __init__(self, problem: str, position: Optional[int] = None, query: Optional[str] = None):
        self.problem = problem
        self.position = position
        self.query = query
        where = f" at position {position}" if position is not None else ""
        super().__init__(f"{problem}{where}")


class SearchUnavailable(SearchEngineError):
    """The engine could not answer (network, rate limit, server error) after its retries."""

    kind = "search_unavailable"


@dataclass
class Hit:
    """One ranked document, named as in pyserini (`docid`, `score`, `rank` from 1)."""

    docid: str
    score: float
    rank: int


@dataclass
class SearchResult:
    """What an engine returns: ranked ids (at most k), their scores, and the total match count
    (None when the engine did not count: the local engine counts only on request)."""

    ids: List[str]
    total: Optional[int]
    scores: Optional[List[float]] = None
    query: str = ""
    engine: str = ""
    k: int = 0
    error: Optional[Dict[str, str]] = None
    warnings: List[str] = field(default_factory=list)
    query_translation: Optional[str] = None
    elapsed_s: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def hits(self) -> List[Hit]:
        scores = self.scores if self.scores is not None else [0.0] * len(self.ids)
        return [Hit(docid=d, score=float(s), rank=i + 1) for i, (d, s) in enumerate(zip(self.ids, scores))]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SearchResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def failed(cls, error: SearchEngineError, query: str = "", engine: str = "", k: int = 0) -> "SearchResult":
        return cls(ids=[], total=0, query=query, engine=engine, k=k, error=error.to_dict())


# ranked ids one search may return: tantivy allocates k slots up front (k = 10**12 aborts the process),
# and the live APIs page through k ids; the original DeepRetrieval's largest cut-off is 9,999
MAX_K = 100_000


def check_k(k: Any) -> int:
    """k as an int in [0, MAX_K] (an integral float is accepted); anything else is a ValueError
    naming the accepted range, in constant time whatever the size of the number."""
    wrong = ValueError(f"k must be an integer between 0 and {MAX_K:,}, got {type(k).__name__} {str(k)[:20]!r}"
                       if not isinstance(k, int) else f"k must be between 0 and {MAX_K:,}")
    if isinstance(k, bool) or not (isinstance(k, float) or hasattr(k, "__index__")):
        raise wrong
    if not isinstance(k, float):
        k = operator.index(k)  # int, numpy integers
    elif isinstance(k, float):
        if not k.is_integer():
            raise wrong
        k = int(k)
    if not 0 <= k <= MAX_K:
        raise ValueError(f"k must be between 0 and {MAX_K:,}, got {k:,}" if k.bit_length() < 64
                         else f"k must be between 0 and {MAX_K:,}, got a {k.bit_length()}-bit number")
    return k


class SearchEngine:
    """Base class: subclasses implement `search` and set `name`."""

    name = "engine"

    def search(self, query: str, k: int = 100, **filters: Any) -> SearchResult:
        raise NotImplementedError  # abstract: each engine defines it

    def try_search(self, query: str, k: int = 100, **filters: Any) -> SearchResult:
        """Like `search`, but a classified error comes back inside the result instead of raising."""
        start = time.perf_counter()
        try:
            return self.search(query, k=k, **filters)
        except SearchEngineError as exc:
            result = SearchResult.failed(exc, query=query, engine=self.name, k=k)
            result.elapsed_s = time.perf_counter() - start
            return result

    def batch_search(
        self, queries: Sequence[str], k: int = 100, threads: int = 1, **filters: Any
    ) -> List[SearchResult]:
        """pyserini-style batch search; errors are returned inside results, never raised."""
        if threads <= 1 or len(queries) <= 1:
            return [self.try_search(q, k=k, **filters) for q in queries]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(lambda q: self.try_search(q, k=k, **filters), queries))

    def close(self) -> None:
        """Release files, sessions and pools; engines are also context managers."""

    def __enter__(self) -> "SearchEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# name -> "module:attribute"; imported lazily so a missing optional dependency of one engine
# does not break the others.
ENGINES: Dict[str, str] = {
    "local": "deepretrieval.search.local:LocalSearchEngine",
    "pubmed": "deepretrieval.search.pubmed:PubMedSearchEngine",
    "ctgov": "deepretrieval.search.ctgov:CTGovSearchEngine",
}


def register_engine(name: str, target: "str | Callable[..., SearchEngine]") -> None:
    """Register an engine under `name`: a "module:attribute" path or a factory callable."""
    ENGINES[name] = target  # type: ignore[assignment]


def make_engine(name: str, **options: Any) -> SearchEngine:
    """Build the engine registered as `name` with its constructor options."""
    if name not in ENGINES:
        raise ValueError(f"unknown search engine {name!r}; known: {', '.join(sorted(ENGINES))}")
    target = ENGINES[name]
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module_name), attr)
    return target(**options)
