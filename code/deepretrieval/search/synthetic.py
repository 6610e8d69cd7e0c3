"""Synthetic PubMed-like records for scale benchmarks, generated with numpy in chunks.

`CorpusProfile.from_records` measures a real corpus (the vendored pubmed_mini): the frequency
of every analysed word (title and abstract together), the per-record title and abstract
lengths in words, the MeSH heading frequencies and the number of headings per record that has
any. `generate(n, profile)` draws records from it: lengths by resampling the measured lengths,
words i.i.d. from the measured word frequencies (the real vocabulary with its Zipf-like
frequencies; no word order or co-occurrence), headings likewise (duplicates within a record
dropped). pubmed_mini has no dates, so `pub_date` follows a model, not data: years 1950-2024
with weight growing `YEAR_GROWTH` per year (PubMed's yearly additions grew roughly 4-5%% a
year), uniform month and day 1-28.

The work per chunk is vectorised: every word of the chunk is one uniform draw from the "urn" of
all measured word occurrences (exact sampling by frequency), the chunk's text is one `str.join` of the drawn words, and
each record's title and abstract are slices of it at offsets from one `cumsum`; only the
`Record` construction is per record. Chunks stream (`generate` yields lists), so memory is
bounded by the chunk size. `pubmed_xml` writes records as a PubMed baseline file (for the
reader's throughput).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Union
from xml.sax.saxutils import escape

import numpy as np

from deepretrieval.search.ingest import Record

YEAR_GROWTH = 0.045
YEARS = (1950, 2024)


@dataclass
class CorpusProfile:
    """Distributions measured on a corpus (see the module docstring)."""

    words: np.ndarray  # object array of analysed words
    word_counts: np.ndarray  # int64, occurrences of each word
    title_lengths: np.ndarray  # words per title, one entry per record
    abstract_lengths: np.ndarray  # words per abstract, one entry per record (0: no abstract)
    headings: np.ndarray  # object array of MeSH headings
    heading_counts: np.ndarray
    mesh_lengths: np.ndarray  # headings per record, records with any

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> "CorpusProfile":
        """Measure `records` with the index's analyser (`local.make_analyzer`)."""
        from deepretrieval.search.local import make_analyzer

        analyze = make_analyzer().analyze
        words: Counter = Counter()
        headings: Counter = Counter()
        title_len, abs_len, mesh_len = [], [], []
        for rec in records:
            title, abstract = analyze(rec.title), analyze(rec.abstract)
            words.update(title)
            words.update(abstract)
            title_len.append(len(title))
            abs_len.append(len(abstract))
            if rec.mesh:
                headings.update(rec.mesh)
                mesh_len.append(len(rec.mesh))
        if not words or not headings:
            raise ValueError("the corpus needs words and MeSH headings to draw from")
        return cls(words=np.array(list(words), dtype=object), word_counts=np.array(list(words.values()), np.int64),
                   title_lengths=np.array(title_len, np.int64), abstract_lengths=np.array(abs_len, np.int64),
                   headings=np.array(list(headings), dtype=object),
                   heading_counts=np.array(list(headings.values()), np.int64),
                   mesh_lengths=np.array(mesh_len, np.int64))

    @classmethod
    def from_corpus(cls, path: Union[str, Path]) -> "CorpusProfile":
        """Measure a corpus file (any format `ingest.iter_records` reads)."""
        from deepretrieval.search.ingest import iter_records

        return cls.from_records(iter_records(path))


def _slices(text: str, ends: np.ndarray, starts: np.ndarray) -> List[str]:
    return [text[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def generate(n: int, profile: CorpusProfile, seed: int = 0, chunk: int = 20_000, first_id: int = 1) \
        -> Iterator[List[Record]]:
    """Yield `n` synthetic records in lists of at most `chunk`; ids are `first_id`, `first_id`+1, ..."""
    rng = np.random.default_rng(seed)
    # drawing uniformly from the word stream the counts describe = drawing by frequency, exactly
    word_urn = np.repeat(np.arange(len(profile.words), dtype=np.int32), profile.word_counts)
    heading_urn = np.repeat(np.arange(len(profile.headings), dtype=np.int32), profile.heading_counts)
    spaced = np.array([w + " " for w in profile.words], dtype=object)  # each word with its separator
    spaced_len = np.array([len(w) for w in spaced], np.int64)
    years = np.arange(YEARS[0], YEARS[1] + 1)
    year_p = np.exp(YEAR_GROWTH * (years - years[0]))
    year_p /= year_p.sum()
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        tl = rng.choice(profile.title_lengths, m)
        al = rng.choice(profile.abstract_lengths, m)
        ml = rng.choice(profile.mesh_lengths, m)
        ids = word_urn[rng.integers(0, len(word_urn), int(tl.sum() + al.sum()))]
        text = "".join(spaced[ids].tolist())
        # record j's title is words [w0, w0 + tl[j]), its abstract the next al[j] words
        word_ends = np.cumsum(np.stack([tl, al], 1).ravel())
        char_ends = np.concatenate([[0], np.cumsum(spaced_len[ids])])[word_ends]
        char_starts = np.concatenate([[0], char_ends[:-1]])
        # drop each part's trailing space (an empty part stays empty)
        parts = _slices(text, np.maximum(char_ends - 1, char_starts), char_starts)
        heads = profile.headings[heading_urn[rng.integers(0, len(heading_urn), int(ml.sum()))]].tolist()
        head_ends = np.cumsum(ml).tolist()
        dates = (rng.choice(years, m, p=year_p) * 10000 + rng.integers(1, 13, m) * 100 + rng.integers(1, 29, m)).tolist()
        out, h0 = [], 0
        for j in range(m):
            h1 = head_ends[j]
            out.append(Record(id=str(first_id + start + j), title=parts[2 * j], abstract=parts[2 * j + 1],
                              mesh=list(dict.fromkeys(heads[h0:h1])), pub_date=dates[j]))
            h0 = h1
        yield out


def pubmed_xml(records: Iterable[Record]) -> str:
    """Records as a PubMed baseline file (PMID, title, abstract, MeSH, PubDate), for the reader."""
    parts = ['<?xml version="1.0" encoding="utf-8"?>\n<PubmedArticleSet>\n']
    for r in records:
        date = (f"<PubDate><Year>{r.pub_date // 10000}</Year><Month>{r.pub_date // 100 % 100:02d}</Month>"
                f"<Day>{r.pub_date % 100:02d}</Day></PubDate>" if r.pub_date else "<PubDate></PubDate>")
        abstract = f"<Abstract><AbstractText>{escape(r.abstract)}</AbstractText></Abstract>" if r.abstract else ""
        mesh = "".join(f'<MeshHeading><DescriptorName MajorTopicYN="N">{escape(h)}</DescriptorName></MeshHeading>'
                       for h in r.mesh)
        parts.append(
            f'<PubmedArticle><MedlineCitation Status="MEDLINE"><PMID Version="1">{escape(r.id)}</PMID><Article>'
            f"<Journal><JournalIssue>{date}</JournalIssue></Journal><ArticleTitle>{escape(r.title)}</ArticleTitle>"
            f"{abstract}</Article><MeshHeadingList>{mesh}</MeshHeadingList></MedlineCitation></PubmedArticle>\n")
    parts.append("</PubmedArticleSet>\n")
    return "".join(parts)


def write_jsonl(path: Union[str, Path], records: Iterable[Record]) -> None:
    """Records as gzipped JSON Lines ({id, title, abstract, mesh, pub_date}) for `index build`."""
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as fh:
        for r in records:
            fh.write(json.dumps({"id": r.id, "title": r.title, "abstract": r.abstract, "mesh": r.mesh,
                                 "pub_date": r.pub_date}) + "\n")
