"""Search engines that answer the queries the policy writes.

`make_engine(name, **options)` builds any registered engine: `local` (tantivy index),
`pubmed` (NCBI E-utilities) and `ctgov` (ClinicalTrials.gov API v2).
"""

from deepretrieval.search.base import (
    ENGINES,
    Hit,
    QuerySyntaxError,
    SearchEngine,
    SearchEngineError,
    SearchResult,
    SearchUnavailable,
    make_engine,
)

__all__ = [
    "ENGINES",
    "Hit",
    "QuerySyntaxError",
    "SearchEngine",
    "SearchEngineError",
    "SearchResult",
    "SearchUnavailable",
    "make_engine",
]
