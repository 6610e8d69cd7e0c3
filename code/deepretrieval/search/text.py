"""Free text as a search query: the bag-of-words OR query, query expansion, and the stopword lists the
local engine's searches ignore (`STOPWORD_LISTS`).

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
from typing import Dict, FrozenSet, List, Optional

# Lucene's default English stop set (what pyserini's BM25 drops), plus the Boolean operator
# words, which the PubMed-syntax parser would read as operators.
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then "
    "there these they this to was will with".split()
)
WORD = re.compile(r"[A-Za-z0-9]+")

# Words a search ignores, by list name. An index's metadata names its list (`stopwords`); an engine can
# override it. "pubmed": PubMed's stopwords (NLM's PubMed Help: "commonly found words are not indexed and
# PubMed will ignore them"), the default of a PubMed mirror (search.mirror); "none": every word is searched,
# the default of `index build` (the vendored benchmark indexes and their measured baselines). A stopword is
# ignored where it stands alone (`the`, `of[tiab]`); inside a phrase or a proximity search it is kept.
PUBMED_STOPWORDS = frozenset("""
    a about again all almost also although always among an and another any are as at be because been before
    being between both but by can could did do does done due during each either enough especially etc for found
    from further had has have having here how however i if in into is it its itself just kg km made mainly make
    may mg might ml mm most mostly must nearly neither no nor obtained of often on our overall perhaps pmid
    quite rather really regarding seem seen several should show showed shown shows significantly since so some
    such than that the their theirs them then there therefore these they this those through thus to upon use
    used using various very was we were what when which while with within without would
""".split())
STOPWORD_LISTS: Dict[str, FrozenSet[str]] = {"none": frozenset(), "pubmed": PUBMED_STOPWORDS}
DEFAULT_STOPWORDS = "none"  # `index build`, and indexes whose metadata names no list
MIRROR_STOPWORDS = "pubmed"  # a new PubMed mirror


def check_stopwords(name: str) -> str:
    """`name` if it names a stopword list, else ValueError."""
    if name not in STOPWORD_LISTS:
        raise ValueError(f"stopwords must be one of {', '.join(STOPWORD_LISTS)}, got {name!r}")
    return name


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
