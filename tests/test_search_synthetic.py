"""The synthetic PubMed-like generator (deepretrieval.search.synthetic)."""

import gzip
from collections import Counter

import numpy as np
import pytest

from deepretrieval.search.ingest import Record, iter_records, read_pubmed_xml
from deepretrieval.search.synthetic import CorpusProfile, generate, pubmed_xml, write_jsonl

SOURCE = [
    Record(id="1", title="Aspirin and stroke", abstract="aspirin aspirin trial", mesh=["Aspirin", "Stroke"]),
    Record(id="2", title="Stroke", abstract="", mesh=[]),
    Record(id="3", title="Trial", abstract="aspirin", mesh=["Aspirin"]),
]


def test_profile_measures_words_lengths_and_headings():
    p = CorpusProfile.from_records(SOURCE)
    assert dict(zip(p.words, p.word_counts)) == {"aspirin": 4, "and": 1, "stroke": 2, "trial": 2}
    assert p.title_lengths.tolist() == [3, 1, 1] and p.abstract_lengths.tolist() == [3, 0, 1]
    assert dict(zip(p.headings, p.heading_counts)) == {"Aspirin": 2, "Stroke": 1}
    assert p.mesh_lengths.tolist() == [2, 1]  # records with headings only
    with pytest.raises(ValueError):
        CorpusProfile.from_records([Record(id="1", title="x")])  # no MeSH to draw from


def test_generated_records_follow_the_profile():
    p = CorpusProfile.from_records(SOURCE)
    chunks = list(generate(1000, p, seed=3, chunk=300))
    assert [len(c) for c in chunks] == [300, 300, 300, 100]
    recs = [r for c in chunks for r in c]
    assert [r.id for r in recs] == [str(i) for i in range(1, 1001)]
    assert {len(r.title.split()) for r in recs} <= {1, 3} and {len(r.abstract.split()) for r in recs} <= {0, 1, 3}
    assert {r.abstract for r in recs if not r.abstract.split()} <= {""}  # no stray spaces
    words = Counter(w for r in recs for w in (r.title + " " + r.abstract).split())
    assert set(words) <= {"aspirin", "and", "stroke", "trial"}
    assert words["aspirin"] / sum(words.values()) == pytest.approx(4 / 9, abs=0.03)  # drawn by frequency
    assert all(1 <= len(r.mesh) <= 2 and len(set(r.mesh)) == len(r.mesh) for r in recs)
    years = np.array([r.pub_date // 10000 for r in recs])
    assert years.min() >= 1950 and years.max() <= 2024 and np.mean(years >= 2000) > 0.5  # growth model
    assert all(1 <= r.pub_date // 100 % 100 <= 12 and 1 <= r.pub_date % 100 <= 28 for r in recs)
    def fields(seed):
        return [(r.title, r.abstract, r.mesh, r.pub_date) for c in generate(1000, p, seed=seed, chunk=300) for r in c]

    assert fields(3) == [(r.title, r.abstract, r.mesh, r.pub_date) for r in recs] != fields(4)  # seeded


def test_pubmed_xml_and_jsonl_round_trip(tmp_path):
    p = CorpusProfile.from_records(SOURCE + [Record(id="4", title="A & B <c>", mesh=["R&D"])])
    recs = next(generate(50, p, seed=1))
    path = tmp_path / "pubmed99n0001.xml.gz"
    path.write_bytes(gzip.compress(pubmed_xml(recs).encode()))
    back = list(read_pubmed_xml(path))
    key = [(r.id, r.title, r.abstract, r.mesh, r.pub_date) for r in recs]
    assert [(r.id, r.title, r.abstract, r.mesh, r.pub_date) for r in back] == key
    write_jsonl(tmp_path / "c.jsonl.gz", recs)
    assert [(r.id, r.title, r.abstract, r.mesh, r.pub_date) for r in iter_records(tmp_path / "c.jsonl.gz")] == key
