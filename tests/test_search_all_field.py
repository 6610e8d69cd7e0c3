"""The combined field (local_index.ALL_TEXT_FIELD): all-fields words searched as one term query, with
the per-field index's match sets, BM25 on the combined text against an independent computation, and
the settings of `index build` and the PubMed mirror."""

import json
import math
from pathlib import Path

import pytest

from deepretrieval.cli import main
from deepretrieval.search.local import LocalSearchEngine
from deepretrieval.search.local_index import INDEX_META_FILE, build_index, make_analyzer
from deepretrieval.search.mirror import MirrorError, ingest_pubmed
from test_search_mirror import article, pubmed_file

SMALL = Path(__file__).parent / "fixtures" / "search" / "small_corpus.jsonl"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("allfield")
    build_index(SMALL, root / "fields", progress=False)
    meta = build_index(SMALL, root / "combined", progress=False, all_field=True)
    assert meta["all_field"] is True
    return LocalSearchEngine(root / "fields"), LocalSearchEngine(root / "combined")


@pytest.mark.parametrize("query", [
    "aspirin", "stroke", "aspirin AND NOT stroke", "aspirin OR warfarin AND stroke", "humans", "sepsis",
    "c reactive protein", "c-reactive protein", '"c reactive protein"', "random*", "stroke[ti]", "stroke[tw]",
    "Stroke[mh]", "aspirin AND 2005[dp]", "(aspirin adj3 stroke).tw.", "aspirin[tiab]\nstroke\n#1 AND #2",
    "fibrillation OR rehabilitation OR folding OR termini", "nothingmatches",
])
def test_match_sets_equal_the_per_field_index(engines, query):
    fields, combined = engines
    a, b = fields.search(query, k=100, count=True), combined.search(query, k=100, count=True)
    assert set(a.ids) == set(b.ids) and a.total == b.total


def test_an_all_fields_word_is_bm25_on_the_combined_text(engines):
    """aspirin: BM25 = idf * tf (k1+1) / (tf + k1 (1 - b + b dl/avgdl)) over title + text + MeSH."""
    _, combined = engines
    analyzer = make_analyzer()
    docs = [json.loads(line) for line in SMALL.open()]
    tokens = {d["id"]: analyzer.analyze(" ".join([d["title"], d.get("text", "")] + d.get("mesh", []))) for d in docs}
    avgdl = sum(len(t) for t in tokens.values()) / len(docs)
    tf = {i: t.count("aspirin") for i, t in tokens.items() if "aspirin" in t}
    n, N, k1, b = len(tf), len(docs), 1.2, 0.75
    idf = math.log(1 + (N - n + 0.5) / (n + 0.5))
    expected = {i: idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(tokens[i]) / avgdl)) for i, f in tf.items()}
    res = combined.search("aspirin", k=10)
    assert combined.search("aspirin[all]", k=10).scores == res.scores  # an explicit [all] tag alike
    assert res.ids == sorted(expected, key=lambda i: -expected[i])
    assert res.scores == pytest.approx([expected[i] for i in res.ids], rel=1e-4)
    # d2 says aspirin four times (title, text twice, MeSH): first, as in the per-field sum
    assert res.ids[0] == "d2"


def test_phrases_and_field_tags_still_search_the_fields(engines):
    fields, combined = engines
    for query in ('"c reactive protein"', "aspirin[ti]", "random*", "aspirin[tiab]"):
        a, b = fields.search(query, k=10), combined.search(query, k=10)
        assert (a.ids, a.scores) == (b.ids, b.scores), query


def test_mirror_default_and_fixed_at_creation(tmp_path):
    f1 = pubmed_file(tmp_path / "pubmed25n0001.xml.gz", [article(1, "Aspirin after stroke", year=2001)])
    opts = {"heap_size": 50_000_000, "num_threads": 1, "progress": False}
    summary = ingest_pubmed(tmp_path / "m1", [f1], **opts)
    assert summary["all_field"] is True
    assert json.loads((tmp_path / "m1" / INDEX_META_FILE).read_text())["all_field"] is True
    assert LocalSearchEngine(tmp_path / "m1").search("aspirin").ids == ["1"]
    with pytest.raises(MirrorError, match="fixed when a mirror is created"):
        ingest_pubmed(tmp_path / "m1", [f1], all_field=False, **opts)
    assert ingest_pubmed(tmp_path / "m2", [f1], all_field=False, **opts)["all_field"] is False
    assert LocalSearchEngine(tmp_path / "m2").search("aspirin").ids == ["1"]


def test_cli_flags(tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "build", "--corpus", str(SMALL), "--out", str(out), "--no-progress", "--all-field"]) == 0
    assert "all-fields words are searched in the combined field (all_text)" in capsys.readouterr().out
    assert json.loads((out / INDEX_META_FILE).read_text())["all_field"] is True
    f1 = pubmed_file(tmp_path / "pubmed25n0001.xml.gz", [article(1, "Aspirin after stroke", year=2001)])
    argv = ["index", "ingest-pubmed", "--index", str(tmp_path / "m"), "--no-progress", "--threads", "1",
            "--heap-mb", "50", str(f1)]
    assert main(argv + ["--no-all-field"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        "searches ignore stopwords: pubmed list; all-fields words searched in each field"
    assert json.loads((tmp_path / "m" / INDEX_META_FILE).read_text())["all_field"] is False
