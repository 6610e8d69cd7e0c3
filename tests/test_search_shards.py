"""Sharded local indexes (`build_index(..., shards=N)`) and count-free top-k searches.

Checked against the single index built from the same corpus: Boolean match sets and counts are
identical; ranked recall@100 of the topics' `original` bag-of-words queries is within the stated
tolerance (each shard scores BM25 with its own statistics); a search that does not count returns
the same ids and scores as one that does.
"""

import json
import shutil
import zlib
from pathlib import Path

import pytest

from deepretrieval.cli import main
from deepretrieval.eval.baselines import or_query, relax_expert_search
from deepretrieval.search.base import MAX_K, SearchUnavailable
from deepretrieval.search.local import LocalSearchEngine
from deepretrieval.search.local_index import INDEX_META_FILE, build_index, read_index_meta, shard_of

SMALL = Path(__file__).parent / "fixtures" / "search" / "small_corpus.jsonl"
SHARDS = 4

# Boolean queries exercising every compiler path on pubmed_mini: words, phrases, truncation,
# fields, MeSH, NOT, dates, proximity
BOOLEAN_QUERIES = [
    "aspirin OR warfarin",
    "cancer AND (therapy OR treatment) NOT child*",
    "aspergill*[tiab] AND (sensitivity OR specificity)",
    '"randomized controlled trial" OR randomi*[ti]',
    "humans[mh] AND stroke[tiab] AND 2000:2005[dp]",
    "(heart adj3 failure).ti,ab.",
    "galactomannan",
]


def _topics(name, data_dir):
    return [json.loads(line) for line in (data_dir / name / "topics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pubmed_mini_sharded(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("shards") / "pubmed_mini"
    build_index(data_dir / "pubmed_mini" / "corpus.jsonl.gz", out, progress=False, shards=SHARDS)
    return out


@pytest.fixture(scope="module")
def trials_sigir_sharded(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("shards") / "trials_sigir"
    build_index(data_dir / "trials_sigir" / "corpus.jsonl.gz", out, progress=False, shards=SHARDS)
    return out


def test_shard_of_is_crc32_of_the_utf8_id():
    # CRC-32's published check value: crc32("123456789") = 0xCBF43926
    assert shard_of("123456789", 10) == 2 and shard_of("123456789", 7) == 5  # 3421780262 = 0xCBF43926
    assert shard_of("NCT00001776", 1) == 0
    assert shard_of("é", 5) == zlib.crc32("é".encode("utf-8")) % 5
    assert shard_of("\udcff", 3) in range(3)  # a lone surrogate does not crash the hash


def test_sharded_layout(pubmed_mini_sharded, pubmed_mini_index):
    meta = read_index_meta(pubmed_mini_sharded)
    single = read_index_meta(pubmed_mini_index)
    assert meta["shards"] == [f"shard-{i:03d}" for i in range(SHARDS)]
    assert sum(meta["shard_docs"]) == meta["num_docs"] == single["num_docs"]
    for i, name in enumerate(meta["shards"]):
        shard = LocalSearchEngine(pubmed_mini_sharded / name)  # each shard is a complete index by itself
        assert shard.meta["shard"] == i and shard.num_docs == meta["shard_docs"][i]
        ids = shard.search("humans[mh]", k=MAX_K).ids
        assert ids and all(shard_of(d, SHARDS) == i for d in ids)
    engine = LocalSearchEngine(pubmed_mini_sharded)
    assert engine.num_shards == SHARDS and engine.num_docs == single["num_docs"]


def _boolean_queries(data_dir):
    experts = [relax_expert_search(t["boolean_query"]) for t in _topics("pubmed_mini", data_dir) if t["boolean_query"]]
    return BOOLEAN_QUERIES + experts


def test_boolean_results_identical_to_single_index(pubmed_mini_sharded, pubmed_mini_index, data_dir):
    single, sharded = LocalSearchEngine(pubmed_mini_index), LocalSearchEngine(pubmed_mini_sharded)
    queries = _boolean_queries(data_dir)
    assert len(queries) > 10
    for q in queries:
        a, b = single.try_search(q, k=MAX_K, count=True), sharded.try_search(q, k=MAX_K, count=True)
        assert a.error == b.error and a.warnings == b.warnings, q
        assert a.total == b.total == len(a.ids) and set(a.ids) == set(b.ids), q
    assert sum(single.count(q) for q in queries) > 10_000


def test_truncation_cap_expands_the_same_terms(pubmed_mini_sharded, pubmed_mini_index):
    """With the variants capped, the sharded engine keeps the same most frequent variants (document
    frequencies summed over the shards), so the match set is still the single index's."""
    single = LocalSearchEngine(pubmed_mini_index, max_expansions=7)
    sharded = LocalSearchEngine(pubmed_mini_sharded, max_expansions=7)
    for q in ("a*[tiab]", "pre*", "hyper*[ti]"):
        a, b = single.search(q, k=MAX_K, count=True), sharded.search(q, k=MAX_K, count=True)
        assert any("most frequent were searched" in w for w in a.warnings)
        assert a.warnings == b.warnings and a.total == b.total and set(a.ids) == set(b.ids), q


class _CountingSearcher:
    """A searcher that counts the (term, frequency) pairs `terms_with_prefix` hands back."""

    def __init__(self, searcher):
        self.searcher, self.listed = searcher, 0

    def terms_with_prefix(self, *args, **kwargs):
        terms = self.searcher.terms_with_prefix(*args, **kwargs)
        self.listed += len(terms)
        return terms

    def __getattr__(self, name):
        return getattr(self.searcher, name)


def test_truncation_on_shards_reads_a_bounded_number_of_terms(tmp_path):
    """300 variants of zz*, capped at 5: each of the 3 shards lists at most 4 x 5 + 1 of them."""
    rows = [{"id": f"r{i}", "title": f"zz{i:03d} " + "common " * (i % 7)} for i in range(300)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_index(corpus, tmp_path / "three", progress=False, shards=3)
    engine = LocalSearchEngine(tmp_path / "three", max_expansions=5)
    engine.searchers = [_CountingSearcher(s) for s in engine.searchers]
    result = engine.search("zz*[ti]", k=100)
    assert any("most frequent were searched" in w for w in result.warnings) and len(result.ids) == 5
    assert 0 < sum(s.listed for s in engine.searchers) <= 3 * (4 * 5 + 1)


def _recall(ids, relevant):
    return len(set(ids) & set(relevant)) / len(relevant)


# (global_idf, largest mean recall@100 difference, smallest top-100 overlap): the tolerances.
# Measured with 4 shards: whole-index IDF: 0.0000 / 0.99 (pubmed_mini), 0.0006 / 0.97 (trials_sigir);
# each shard's own IDF: 0.0002 / 0.95 and 0.0012 / 0.92.
TOLERANCES = [(True, 0.003, 95), (False, 0.01, 85)]


@pytest.mark.parametrize("global_idf, max_mean_diff, min_overlap", TOLERANCES)
@pytest.mark.parametrize("corpus, need", [("pubmed_mini", "title"), ("trials_sigir", "patient")])
def test_ranked_recall_within_tolerance(request, data_dir, corpus, need, global_idf, max_mean_diff, min_overlap):
    """The topics' `original` queries (the information need as a bag of words, OR-ed): mean
    recall@100 within `max_mean_diff` of the single index's, and every topic's top 100 shares at
    least `min_overlap` ids with the single index's."""
    single = LocalSearchEngine(request.getfixturevalue(f"{corpus}_index"))
    sharded = LocalSearchEngine(request.getfixturevalue(f"{corpus}_sharded"), global_idf=global_idf)
    r1, r2 = [], []
    for t in _topics(corpus, data_dir):
        q = or_query(t[need])
        a, b = single.search(q, k=100).ids, sharded.search(q, k=100).ids
        assert len(a) == len(b) == 100
        assert len(set(a) & set(b)) >= min_overlap, t["topic_id"]
        r1.append(_recall(a, t["relevant"]))
        r2.append(_recall(b, t["relevant"]))
    assert sum(r1) > 0
    assert abs(sum(r1) - sum(r2)) / len(r1) <= max_mean_diff


def test_global_idf_gives_the_single_index_scores(tmp_path):
    """Every title has two words, so every shard has the single index's average field length and
    the whole-index IDF is the only statistic that differs: with it, each document's score is the
    single index's (to float32 precision); with each shard's own IDF, scores differ."""
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    rows = [{"id": f"r{i}", "title": f"{words[i % 5]} {words[(i * 7) % 4] if i % 3 else words[i % 5]}"}
            for i in range(60)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_index(corpus, tmp_path / "one", progress=False)
    build_index(corpus, tmp_path / "four", progress=False, shards=4)
    single = LocalSearchEngine(tmp_path / "one")
    sharded, own_idf = LocalSearchEngine(tmp_path / "four"), LocalSearchEngine(tmp_path / "four", global_idf=False)
    assert len({shard_of(r["id"], 4) for r in rows}) == 4
    for q in ("alpha OR omega", "beta", '"gamma delta" OR alpha', "r3[uid] OR r8[uid] OR alpha"):
        a, b, c = (dict(zip(r.ids, r.scores)) for r in (e.search(q, k=100) for e in (single, sharded, own_idf)))
        assert a.keys() == b.keys() == c.keys() and a
        assert all(b[d] == pytest.approx(a[d], rel=1e-5) for d in a), q
    assert any(c[d] != pytest.approx(a[d], rel=1e-3) for d in a)


@pytest.mark.parametrize("which", ["pubmed_mini_index", "pubmed_mini_sharded"])
def test_count_free_top_k_equals_counted(request, which):
    engine = LocalSearchEngine(request.getfixturevalue(which))
    for q in BOOLEAN_QUERIES + ["the OR of OR patients", "cancer", "aspirin stroke prevention"]:
        for k in (1, 10, 100):
            counted, free = engine.search(q, k=k, count=True), engine.search(q, k=k)
            assert free.total is None and counted.total >= len(counted.ids)
            assert free.ids == counted.ids and free.scores == counted.scores, (q, k)


def test_merge_order_is_score_then_shard(pubmed_mini_sharded):
    """Ties (`"--" NOT cancer` is everything but cancer, each scored 1.0) are ordered by shard,
    then by position; a shorter list is a prefix of a longer one, so k never changes the order of
    what it keeps."""
    engine = LocalSearchEngine(pubmed_mini_sharded)
    full = engine.search('"--" NOT cancer', k=MAX_K)
    assert set(full.scores) == {1.0} and len(full.ids) > 30_000
    shards = [shard_of(d, SHARDS) for d in full.ids]
    assert shards == sorted(shards) and set(shards) == set(range(SHARDS))
    for q in ('"--" NOT cancer', "humans[mh]", "aspirin OR warfarin OR stroke"):
        long = engine.search(q, k=500)
        assert long.scores == sorted(long.scores, reverse=True)
        for k in (1, 7, 100):
            assert engine.search(q, k=k).ids == long.ids[:k]


def test_concurrent_searches_on_shards_agree(pubmed_mini_sharded):
    engine = LocalSearchEngine(pubmed_mini_sharded, search_threads=2)
    queries = BOOLEAN_QUERIES * 3
    alone = [engine.search(q, k=50).ids for q in queries]
    together = engine.batch_search(queries, k=50, threads=4)
    assert [r.ids for r in together] == alone
    engine.close()
    assert engine.search(queries[0], k=50).ids == alone[0]  # a closed engine's pool is made again


def test_cli_index_build_shards(tmp_path, capsys):
    single, sharded = tmp_path / "one", tmp_path / "three"
    assert main(["index", "build", "--corpus", str(SMALL), "--out", str(single), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["index", "build", "--corpus", str(SMALL), "--out", str(sharded), "--shards", "3", "--threads", "2",
                 "--heap-mb", "50", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "indexed 8 documents (jsonl)" in out and "in 3 shards" in out
    assert sorted(p.name for p in sharded.iterdir()) == [INDEX_META_FILE, "shard-000", "shard-001", "shard-002"]
    results = []
    for index in (single, sharded):
        assert main(["search", "--index", str(index), "--json", "--total", "--k", "100", "aspirin AND NOT stroke"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert set(results[0]["ids"]) == set(results[1]["ids"]) == {"d2", "d7"}  # by hand from the fixture
    assert results[0]["total"] == results[1]["total"] == 2
    assert main(["index", "build", "--corpus", str(SMALL), "--out", str(tmp_path / "x"), "--shards", "0"]) == 2
    assert "--shards must be between 1 and" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shards must be between"):
        build_index(SMALL, tmp_path / "y", progress=False, shards=10_000)


@pytest.fixture()
def small_sharded(tmp_path):
    out = tmp_path / "idx"
    build_index(SMALL, out, progress=False, shards=3)
    return out


def _search_cli(capsys, index):
    code = main(["search", "--index", str(index), "aspirin"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_missing_shard_is_a_classified_error(small_sharded, capsys):
    shutil.rmtree(small_sharded / "shard-001")
    with pytest.raises(SearchUnavailable, match="shard shard-001 of index .* is missing or incomplete"):
        LocalSearchEngine(small_sharded)
    code, err = _search_cli(capsys, small_sharded)
    assert code == 3 and len(err) == 1 and "shard-001" in err[0] and "rebuild" in err[0]


def test_damaged_shard_is_a_classified_error(small_sharded, capsys):
    (small_sharded / "shard-002" / "meta.json").write_text("{ damaged")  # tantivy's own metadata
    with pytest.raises(SearchUnavailable, match="cannot open index .*shard-002"):
        LocalSearchEngine(small_sharded)
    code, err = _search_cli(capsys, small_sharded)
    assert code == 3 and len(err) == 1 and "shard-002" in err[0]


@pytest.mark.parametrize("shards", [["../elsewhere"], [3], "shard-000"])
def test_foreign_shard_list_is_a_classified_error(small_sharded, shards):
    meta = json.loads((small_sharded / INDEX_META_FILE).read_text())
    meta["shards"] = shards
    (small_sharded / INDEX_META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SearchUnavailable, match="'shards'"):
        LocalSearchEngine(small_sharded)


def test_sharded_engine_searches_in_a_forked_child(small_sharded):
    """A fork copies the shard pool without its threads: the child makes its own (with the
    inherited pool, whose threads all exist, the child's search waited forever)."""
    import multiprocessing

    engine = _FORKED["engine"] = LocalSearchEngine(small_sharded)
    try:
        expected = engine.search("aspirin", k=10).ids
        engine.batch_search(["aspirin"] * 30, k=10, threads=4)  # every pool thread now exists in the parent
        assert len(engine._pool._threads) == engine.num_shards == 3
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(_search_in_child, ("aspirin",)).get(timeout=30)
    finally:
        _FORKED.clear()
    assert got == expected and set(got) == {"d1", "d2", "d3", "d7"}  # by hand from the fixture


_FORKED = {}  # the engine a forked child inherits


def _search_in_child(query):
    return _FORKED["engine"].search(query, k=10).ids
