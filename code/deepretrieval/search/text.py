"""Free text as a search query: the bag-of-words OR query, and query expansion.

    bag_of_words(text)          distinct lower-cased alphanumeric tokens, stop words dropped
    or_query(text)              `w1 OR w2 OR ...`: how free text is issued to the local engine (which
                                reads bare words as an implicit AND), ranked by BM25 over every word
    expanded_query(text, q)     `(or_query(text)) OR (q)`: a written query *added* to the text it was
                                written for (query expansion, as query2doc / HyDE add generated text to
                                the user's query). Every clause of an OR adds its BM25 score, so a word
                                of the text written again in `q` weighs twice, and a new word (a
                                condition's name, a synonym) brings in what the text alone misses.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

# Lucene's default English stop set (what pyserini's BM25 drops), plus the Boolean operator
# words, which the PubMed-syntax parser would read as operators.
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then "
    "there these they this to was will with".split()
)
WORD = re.compile(r"[A-Za-z0-9]+")


def bag_of_words(text: str) -> List[str]:
    """Distinct lower-cased alphanumeric tokens of `text`, stop words dropped, in first-seen order."""
    seen: Dict[str, None] = {}
    for tok in WORD.findall(text or ""):
        low = tok.lower()
        if low not in STOPWORDS:
            seen.setdefault(low, None)
    return list(seen)


def or_query(text: str) -> Optional[str]:
    """`text` as a bag-of-words query: `w1 OR w2 OR ...` (None if no word survives)."""
    words = bag_of_words(text)
    return " OR ".join(words) if words else None


def expanded_query(text: str, query: str) -> str:
    """`query` added to `text`'s bag-of-words query: `(w1 OR ... OR wn) OR (query)`; `query` alone
    when no word of `text` survives. `query` keeps its own syntax inside its parentheses."""
    base = or_query(text)
    return f"({base}) OR ({query})" if base else query
