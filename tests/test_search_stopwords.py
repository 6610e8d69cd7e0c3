"""Stopwords in the local engine: PubMed's list ignored where a word stands alone (hand-checked on the
fixture corpus), kept in phrases; the index's default (build: none, PubMed mirror: pubmed), the engine's
override, the CLI flags, and damaged settings."""

import json
from pathlib import Path

import pytest

from deepretrieval.cli import main
from deepretrieval.search.base import SearchUnavailable
from deepretrieval.search.local import LocalSearchEngine
from deepretrieval.search.local_index import INDEX_META_FILE, build_index
from deepretrieval.search.mirror import MANIFEST_FILE, ingest_pubmed
from deepretrieval.search.text import PUBMED_STOPWORDS, STOPWORD_LISTS
from test_search_mirror import article, pubmed_file

SMALL = Path(__file__).parent / "fixtures" / "search" / "small_corpus.jsonl"


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    out = tmp_path_factory.mktemp("stop") / "idx"
    build_index(SMALL, out, progress=False)
    return out


def hits(engine, query):
    res = engine.search(query, k=100, count=True)
    return res.ids, res.scores, res.warnings


def test_the_pubmed_list():
    # NLM's list (PubMed Help, "Stopwords"): 133 words; "not" is an operator, not a stopword, and
    # pronouns such as "he" are not on it
    assert len(PUBMED_STOPWORDS) == 133
    assert {"the", "of", "and", "with", "using", "significantly", "pmid", "kg"} <= PUBMED_STOPWORDS
    assert not {"not", "he", "she", "patient", "trial"} & PUBMED_STOPWORDS
    assert STOPWORD_LISTS["none"] == frozenset()


def test_build_default_searches_every_word(index):
    engine = LocalSearchEngine(index)
    assert json.loads((index / INDEX_META_FILE).read_text())["stopwords"] == "none"
    assert engine.stopword_list == "none"
    ids, _, warnings = hits(engine, "the")
    assert ids == ["d1"] and warnings == []  # "reduces the risk of stroke"
    assert set(hits(engine, "of")[0]) == {"d1", "d5", "d7", "d8"}


def test_pubmed_stopwords_are_ignored_alone_and_kept_in_phrases(index):
    engine = LocalSearchEngine(index, stopwords="pubmed")
    plain = LocalSearchEngine(index)
    ids, scores, warnings = hits(engine, "the")
    assert ids == [] and warnings == ["stopwords ignored (pubmed list): the", "the query has no searchable terms"]
    # ignored inside a Boolean query: the same ids and scores as the query without it
    for query, same in [("of OR stroke", "stroke"), ("aspirin AND the[tiab]", "aspirin"),
                        ("effects of the stroke", "effects stroke")]:
        ids, scores, warnings = hits(engine, query)
        assert (ids, scores) == hits(plain, same)[:2], query
        assert warnings and warnings[0].startswith("stopwords ignored (pubmed list): ")
    assert hits(engine, "effects of the stroke")[2][0] == "stopwords ignored (pubmed list): of, the"
    # a phrase keeps its stopwords: "risk of stroke" is d1's text, "markers of bacterial" d5's
    assert hits(engine, '"risk of stroke"')[0] == ["d1"]
    assert hits(engine, '"markers of bacterial"[tiab]')[0] == ["d5"]
    assert hits(engine, '"risk of stroke"')[2] == []
    # with every word searched, "of OR stroke" also finds the records that only say "of"
    assert set(hits(plain, "of OR stroke")[0]) == {"d1", "d3", "d4", "d5", "d7", "d8"}
    assert set(hits(engine, "of OR stroke")[0]) == {"d1", "d3", "d4"}


def test_index_default_and_engine_override(tmp_path):
    out = tmp_path / "idx"
    meta = build_index(SMALL, out, progress=False, stopwords="pubmed")
    assert meta["stopwords"] == "pubmed"
    assert hits(LocalSearchEngine(out), "the")[0] == []
    assert hits(LocalSearchEngine(out, stopwords="none"), "the")[0] == ["d1"]


def test_unknown_or_damaged_settings(tmp_path, index):
    with pytest.raises(ValueError, match="stopwords must be one of none, pubmed, got 'lucene'"):
        build_index(SMALL, tmp_path / "idx", progress=False, stopwords="lucene")
    assert not (tmp_path / "idx").exists()
    with pytest.raises(ValueError, match="got 'lucene'"):
        LocalSearchEngine(index, stopwords="lucene")
    damaged = tmp_path / "damaged"
    build_index(SMALL, damaged, progress=False)
    meta = json.loads((damaged / INDEX_META_FILE).read_text())
    for value, phrase in [("lucene", "unknown stopword list 'lucene'"), (["the"], "'stopwords' is a list")]:
        (damaged / INDEX_META_FILE).write_text(json.dumps({**meta, "stopwords": value}))
        with pytest.raises(SearchUnavailable, match=phrase):
            LocalSearchEngine(damaged)


def test_mirror_ignores_pubmed_stopwords_unless_told(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f1 = pubmed_file(src / "pubmed25n0001.xml.gz", [article(1, "The effect of aspirin", year=2001)])
    mirror = tmp_path / "mirror"
    summary = ingest_pubmed(mirror, [f1], heap_size=50_000_000, num_threads=1, progress=False)
    assert summary["stopwords"] == "pubmed"
    assert json.loads((mirror / MANIFEST_FILE).read_text())["stopwords"] == "pubmed"
    assert json.loads((mirror / INDEX_META_FILE).read_text())["stopwords"] == "pubmed"
    assert hits(LocalSearchEngine(mirror), "the")[0] == []
    assert hits(LocalSearchEngine(mirror), "the OR aspirin")[0] == ["1"]
    # changed on a rerun with no file due: saved by itself, the documents untouched
    summary = ingest_pubmed(mirror, [f1], heap_size=50_000_000, num_threads=1, progress=False, stopwords="none")
    assert summary["files_applied"] == [] and summary["num_docs"] == 1 and summary["stopwords"] == "none"
    assert json.loads((mirror / INDEX_META_FILE).read_text())["stopwords"] == "none"
    assert hits(LocalSearchEngine(mirror), "the")[0] == ["1"]
    # a later run without the option keeps the mirror's list
    assert ingest_pubmed(mirror, [f1], heap_size=50_000_000, num_threads=1, progress=False)["stopwords"] == "none"


def test_cli_flags(tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "build", "--corpus", str(SMALL), "--out", str(out), "--no-progress",
                 "--stopwords", "pubmed"]) == 0
    assert "searches ignore stopwords (pubmed list)" in capsys.readouterr().out
    assert main(["search", "--index", str(out), "--json", "the OR aspirin"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["ids"]) == {"d1", "d2", "d3", "d7"}
    assert "stopwords ignored (pubmed list): the" in result["warnings"]
    assert main(["search", "--index", str(out), "--json", "--stopwords", "none", "the"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == ["d1"]
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error
        main(["index", "build", "--corpus", str(SMALL), "--out", str(tmp_path / "x"), "--stopwords", "lucene"])
    assert exit_.value.code == 2 and "invalid choice: 'lucene'" in capsys.readouterr().err
