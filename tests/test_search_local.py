"""Local tantivy engine: results on a hand-checked fixture corpus, BM25 against an independent
computation, date filters, Ovid searches, the vendored pubmed_mini index against set algebra
computed from the corpus text, atomic builds and thread safety."""

import gzip
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deepretrieval.search import ingest, local_index
from deepretrieval.search.base import QuerySyntaxError, SearchUnavailable, make_engine
from deepretrieval.search.local import LocalSearchEngine
from deepretrieval.search.local_index import INDEX_META_FILE, build_index, make_analyzer

FIXTURES = Path(__file__).parent / "fixtures" / "search"
SMALL = FIXTURES / "small_corpus.jsonl"


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "idx"
    build_index(SMALL, out, progress=False)
    return LocalSearchEngine(out)


def ids(engine, query, k=100_000, **kw):
    res = engine.search(query, k=k, count=True, **kw)
    assert res.total == len(res.ids), "total must count every match (k is larger than the corpus)"
    return set(res.ids)


# hand-checked against tests/fixtures/search/small_corpus.jsonl
@pytest.mark.parametrize("query,expected", [
    ("aspirin", {"d1", "d2", "d3", "d7"}),
    ("aspirin AND NOT stroke", {"d2", "d7"}),
    ("aspirin NOT stroke", {"d2", "d7"}),
    ("stroke NOT aspirin", {"d4"}),
    ("aspirin OR warfarin AND stroke", {"d1", "d3"}),  # (aspirin OR warfarin) AND stroke
    ("aspirin OR (warfarin AND stroke)", {"d1", "d2", "d3", "d7"}),
    ("stroke[ti]", {"d1", "d4"}),
    ("stroke[tw]", {"d1", "d3", "d4"}),
    ("Stroke[mh]", {"d1", "d3"}),  # exact heading: not "Stroke Rehabilitation"
    ('"stroke rehabilitation"[mesh]', {"d4"}),
    ("random*[tiab]", {"d7", "d8"}),
    ("randomiz*[tiab]", {"d7", "d8"}),
    ("randomized[tiab]", {"d7"}),
    ("c-reactive protein[tiab]", {"d5"}),  # phrase
    ('"c reactive protein"', {"d5"}),
    ("c reactive protein", {"d5", "d6"}),  # implicit AND of words
    ("2001:2005[dp]", {"d1", "d2", "d7"}),
    ("aspirin AND 2005[dp]", {"d2"}),
    ('"Meta-Analysis"[pt]', {"d5"}),
    ("randomized controlled trial[pt]", {"d7"}),
    ("d3[pmid]", {"d3"}),
    ("aspirin[tiab]\nstroke[ti]\n#1 AND #2", {"d1"}),
    ("exp Aspirin/\nStroke/\n1 and 2", {"d1", "d3"}),
    ("(aspirin adj3 stroke).tw.", {"d1", "d3"}),
    ("(stroke adj3 aspirin).tw.", {"d1", "d3"}),  # adjN: any order
    ("(aspirin adj stroke).tw.", set()),  # adj: adjacent, in order
    ("(stroke adj3 (aspirin or warfarin)).tw.", {"d1", "d3"}),
    ("(random$ adj2 trial$).ti,ab.", {"d7"}),  # d8: two words between randomisation and trials
    ("(random$ adj3 trial$).ti,ab.", {"d7", "d8"}),
    ("smith[au] OR aspirin[ti]", {"d1", "d2", "d3", "d7"}),
])
def test_hand_checked_results(small_engine, query, expected):
    assert ids(small_engine, query) == expected


def test_date_filters_exclude_undated_records(small_engine):
    assert ids(small_engine, "protein") == {"d5", "d6"}
    assert ids(small_engine, "protein", min_date="2000") == {"d6"}  # d5 has no date
    assert ids(small_engine, "aspirin", min_date="2004/01/01", max_date="2008") == {"d2", "d3"}
    assert ids(small_engine, "aspirin", max_date="2003/03/03") == {"d1", "d7"}
    with pytest.raises(ValueError):
        small_engine.search("aspirin", min_date="yesterday")


def test_bm25_matches_independent_computation(small_engine):
    """aspirin[ti]: tf = 1 everywhere, so BM25 = idf * (k1+1) / (1 + k1 (1 - b + b dl/avgdl))."""
    analyzer = make_analyzer()
    docs = [json.loads(l) for l in SMALL.open()]
    lengths = {d["id"]: len(analyzer.analyze(d["title"])) for d in docs}
    avgdl = sum(lengths.values()) / len(docs)
    matching = [d["id"] for d in docs if "aspirin" in analyzer.analyze(d["title"])]
    n, N, k1, b = len(matching), len(docs), 1.2, 0.75
    idf = math.log(1 + (N - n + 0.5) / (n + 0.5))
    expected = {d: idf * (k1 + 1) / (1 + k1 * (1 - b + b * lengths[d] / avgdl)) for d in matching}
    res = small_engine.search("aspirin[ti]", k=10)
    assert res.ids == sorted(expected, key=lambda d: -expected[d]) == ["d2", "d1", "d3", "d7"]
    for doc_id, score in zip(res.ids, res.scores):
        assert score == pytest.approx(expected[doc_id], rel=1e-4)


def test_result_shape_and_k(small_engine):
    res = small_engine.search("aspirin", k=2, count=True)
    assert len(res.ids) == 2 and res.total == 4 and res.engine == "local" and res.error is None
    assert res.scores[0] >= res.scores[1]
    assert small_engine.search("aspirin", k=0).ids == [] and small_engine.count("aspirin") == 4
    assert make_engine("local", index_dir=small_engine.index_dir).search("aspirin", k=5, count=True).total == 4


@pytest.mark.parametrize("k", [-1, 100_001, 10**12, 2**64, pytest.param(10**5000, id="5001-digits"), 2.5, "100", None, True])
def test_k_out_of_range_is_a_value_error_not_an_abort(small_engine, k):
    # tantivy allocates k result slots up front: k = 10**12 used to abort the whole process (rc 134)
    with pytest.raises(ValueError, match="k must be"):
        small_engine.search("aspirin", k=k)


def test_k_at_the_limits(small_engine):
    from deepretrieval.search.base import MAX_K

    assert small_engine.search("aspirin", k=0).ids == []
    assert small_engine.search("aspirin", k=MAX_K).ids == small_engine.search("aspirin", k=1000).ids
    assert small_engine.search("aspirin", k=3.0).k == 3  # an integral float is accepted


def test_warnings_for_unavailable_fields(small_engine):
    res = small_engine.search("aspirin[majr]")
    assert set(res.ids) == {"d1", "d2", "d3", "d7"}  # no major-topic data: searched as [mh]
    assert any("[majr]" in w for w in res.warnings)
    res = small_engine.search("aspirin AND smith[au]", count=True)
    assert res.total == 0 and any("[au]" in w for w in res.warnings)


def test_syntax_errors_raise_and_try_search_returns_them(small_engine):
    with pytest.raises(QuerySyntaxError) as e:
        small_engine.search("aspirin[foo]")
    assert e.value.position == 7
    res = small_engine.try_search("(aspirin")
    assert res.error["type"] == "query_syntax" and res.ids == [] and res.total == 0


def test_truncation_cap(tmp_path):
    corpus = tmp_path / "c.jsonl"
    with corpus.open("w") as fh:
        for i in range(30):
            fh.write(json.dumps({"id": f"x{i}", "text": f"term{i:03d} " * (i + 1)}) + "\n")
    build_index(corpus, tmp_path / "idx", progress=False)
    engine = LocalSearchEngine(tmp_path / "idx", max_expansions=10)
    res = engine.search("term*[ab]", k=100, count=True)
    assert res.total == 10 and any("more than 10 variants" in w for w in res.warnings)
    assert LocalSearchEngine(tmp_path / "idx").count("term*[ab]") == 30


def test_concurrent_searches_match_sequential(small_engine):
    queries = ["aspirin", "stroke NOT aspirin", "random*[tiab]", "(aspirin adj3 stroke).tw.", "2001:2005[dp]"] * 20
    sequential = [small_engine.search(q, k=10).ids for q in queries]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda q: small_engine.search(q, k=10).ids, queries))
    assert parallel == sequential


# ----------------------------------------------------------------------------- building

def test_interrupted_build_leaves_nothing_that_opens(tmp_path, monkeypatch):
    real = ingest.iter_records

    def broken(paths, fmt=None, **kwargs):
        for i, rec in enumerate(real(paths, fmt, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield rec

    monkeypatch.setattr("deepretrieval.search.local_index.iter_records", broken)
    out = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        build_index(SMALL, out, progress=False, batch_size=2)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the partial directory was removed
    with pytest.raises(SearchUnavailable):
        LocalSearchEngine(out)


def test_stale_partial_of_a_killed_build_is_removed(tmp_path):
    stale = tmp_path / ".idx.partial-999999999"  # no such process
    stale.mkdir()
    (stale / "junk").write_text("x")
    build_index(SMALL, tmp_path / "idx", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


@pytest.mark.parametrize("finished", [True, False])
def test_a_build_killed_between_its_renames_is_recovered(tmp_path, finished):
    """Killed after the old index moved aside and before the new one moved in: no index at `out`.
    The next build's cleanup moves the finished new one (5 records) in, else the old one (3) back."""
    out = tmp_path / "idx"
    build_index(SMALL, tmp_path / "old", progress=False, limit=3)
    build_index(SMALL, tmp_path / "new", progress=False, limit=5)
    (tmp_path / "old").rename(tmp_path / ".idx.old-999999999")  # no such process
    (tmp_path / "new").rename(tmp_path / ".idx.partial-999999999")
    if not finished:
        (tmp_path / ".idx.partial-999999999" / INDEX_META_FILE).unlink()  # killed before its metadata
    local_index._remove_stale_partials(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert LocalSearchEngine(out).num_docs == (5 if finished else 3)


def test_rebuild_replaces_index_and_refuses_foreign_dirs(tmp_path):
    out = tmp_path / "idx"
    build_index(SMALL, out, progress=False)
    meta = build_index(SMALL, out, progress=False, limit=3)
    assert meta["num_docs"] == 3 and LocalSearchEngine(out).num_docs == 3
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_index(SMALL, foreign, progress=False)
    assert (foreign / "notes.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_index(SMALL, empty, progress=False)["num_docs"] == 8
    assert (empty / INDEX_META_FILE).exists()


# ----------------------------------------------------------------------------- pubmed_mini

@pytest.fixture(scope="module")
def pubmed_mini(pubmed_mini_index):
    return LocalSearchEngine(pubmed_mini_index)


@pytest.fixture(scope="module")
def corpus_tokens(data_dir):
    """Per document: the set of title+abstract tokens (same analyser), from the raw corpus."""
    analyzer = make_analyzer()
    out = {}
    with gzip.open(data_dir / "pubmed_mini" / "corpus.jsonl.gz", "rt") as fh:
        for line in fh:
            r = json.loads(line)
            out[r["pmid"]] = set(analyzer.analyze(r["title"])) | set(analyzer.analyze(r["abstract"]))
    return out


def test_pubmed_mini_boolean_algebra_against_corpus(pubmed_mini, corpus_tokens):
    def having(tok):
        return {d for d, toks in corpus_tokens.items() if tok in toks}

    a, b = having("aspirin"), having("warfarin")
    assert len(corpus_tokens) == 41060 and pubmed_mini.num_docs == 41060
    assert ids(pubmed_mini, "aspirin[tiab] AND NOT warfarin[tiab]") == a - b
    assert ids(pubmed_mini, "aspirin[tiab] AND warfarin[tiab]") == a & b
    assert pubmed_mini.count("aspirin[tiab] OR warfarin[tiab]") == len(a | b)
    prefix = {d for d, toks in corpus_tokens.items() if any(t.startswith("aspergill") for t in toks)}
    assert pubmed_mini.search("aspergill*[tiab]", k=0, count=True).total == len(prefix) > 100


def test_every_topic_boolean_query_runs(pubmed_mini, data_dir):
    topics = [json.loads(l) for l in (data_dir / "pubmed_mini" / "topics.jsonl").open()]
    for t in topics:
        if t["boolean_query"]:
            res = pubmed_mini.search(t["boolean_query"], k=10, count=True)
            assert res.error is None and res.total >= 0
    cd009185 = next(t for t in topics if t["topic_id"] == "clef2017-CD009185")
    res = pubmed_mini.search(cd009185["boolean_query"], k=2000)
    assert set(cd009185["relevant"]) <= set(res.ids)  # recall 1.0 on this topic


def test_trials_index(trials_sigir_index):
    engine = LocalSearchEngine(trials_sigir_index)
    assert engine.num_docs == 3625
    res = engine.search("bipolar AND lithium", k=50)
    assert "NCT00000369" in res.ids
    res = engine.search("bipolar disorder[mh]", k=5, count=True)
    assert res.total == 0 and any("no MeSH headings" in w for w in res.warnings)
    res = engine.search("randomized controlled trial[pt]", k=5, count=True)
    assert res.total == 0 and any("no publication types" in w for w in res.warnings)


def test_exponential_line_reuse_is_refused_quickly(small_engine):
    lines = ["aspirin"] + [f"#{i} AND #{i}" for i in range(1, 30)]
    with pytest.raises(QuerySyntaxError, match="too complex"):
        small_engine.search("\n".join(lines))
    assert small_engine.count("\n".join(lines[:6])) == 4  # 2^5 clauses is fine


# ----------------------------------------------------------------------------- budgets (issue #19)

import re  # noqa: E402
import time  # noqa: E402

from deepretrieval.search.local import COST_POSITION_POSTING, COST_TERM  # noqa: E402
from deepretrieval.search.query import MAX_QUERY_DEPTH  # noqa: E402

ASPIRIN = {"d1", "d2", "d3", "d7"}


def _call_with_stack_depth(frames, fn, *args):
    """fn(*args) called `frames` Python frames deep (a reward computed deep inside a trainer)."""
    if frames <= 0:
        return fn(*args)
    return _call_with_stack_depth(frames - 1, fn, *args)


@pytest.mark.parametrize("query", [
    "(" * MAX_QUERY_DEPTH + "aspirin" + ")" * MAX_QUERY_DEPTH,
    "aspirin" + "".join(f" NOT zzz{i}" for i in range(MAX_QUERY_DEPTH - 1)),
    "aspirin" + "".join(" OR zzz" if i % 2 else " AND aspirin" for i in range(MAX_QUERY_DEPTH - 1)),
    "(((aspirin adj5 stroke) not zzz) and aspirin).tw.",
])
def test_queries_at_the_depth_limit_run_even_deep_in_a_stack(small_engine, query):
    expected = {"d1", "d3"} if "adj5" in query else ASPIRIN
    res = _call_with_stack_depth(500, small_engine.search, query, 100)
    assert set(res.ids) == expected


@pytest.mark.parametrize("query", [
    "(" * 330 + "aspirin" + ")" * 330,
    "(" * 5000 + "aspirin" + ")" * 5000,
    "aspirin" + " NOT stroke" * 500,
    "aspirin" + " AND stroke OR warfarin" * 400,
    "\n".join(["aspirin"] + [f"#{i} NOT x" for i in range(1, 400)]),
    "(" + " adj2 ".join(["aspirin"] * 40) + ").tw.",  # proximity variants doubled per adj: was exponential
    "(aspir$999999 adj stroke).tw.",  # a regex tantivy cannot compile
    "aspirin$100",  # limited truncation is at most $99
    "#" + "1" * 5000,  # found by the fuzz test: int() of a 5000-digit line number raised ValueError
])
def test_too_deep_or_too_large_queries_are_syntax_errors_quickly(small_engine, query):
    start = time.process_time()
    with pytest.raises(QuerySyntaxError):
        small_engine.search(query, k=10)
    assert time.process_time() - start < 3


def _title_df(term):
    """Titles of the fixture corpus containing `term` (independent of tantivy)."""
    rows = [json.loads(line) for line in SMALL.open()]
    return sum(term in re.findall(r"[a-z0-9]+", r["title"].lower()) for r in rows)


def _prefix_title_terms(prefix):
    rows = [json.loads(line) for line in SMALL.open()]
    terms = {}
    for r in rows:
        for t in set(re.findall(r"[a-z0-9]+", r["title"].lower())):
            if t.startswith(prefix):
                terms[t] = terms.get(t, 0) + 1
    return terms


def test_cost_budget_is_exact_on_hand_computed_costs(small_engine):
    aspirin, resistance, stroke = _title_df("aspirin"), _title_df("resistance"), _title_df("stroke")
    assert (aspirin, resistance, stroke) == (4, 1, 2)
    random_terms = _prefix_title_terms("random")
    assert random_terms == {"randomized": 1, "randomization": 1}
    cases = {
        "aspirin[ti]": COST_TERM + aspirin,
        '"aspirin resistance"[ti]': 2 * COST_TERM + COST_POSITION_POSTING * (aspirin + resistance),
        "random*[ti]": COST_TERM * len(random_terms) + sum(random_terms.values()),
        '"random* aspirin"[ti]': 2 * COST_TERM + COST_POSITION_POSTING * (sum(random_terms.values()) + aspirin),
        # adj2 is unordered: 2 phrase variants, each reading both words' positions
        "(aspirin adj2 stroke).ti.": 2 * COST_TERM + COST_POSITION_POSTING * 2 * (aspirin + stroke),
    }
    for query, cost in cases.items():
        assert LocalSearchEngine(small_engine.index_dir, max_query_cost=cost).count(query) >= 0
        with pytest.raises(QuerySyntaxError, match="too expensive"):
            LocalSearchEngine(small_engine.index_dir, max_query_cost=cost - 1).search(query)


def test_wildcard_phrases_from_the_issue_are_refused_quickly(pubmed_mini):
    """64 OR-ed wildcard phrases (700 characters) took ~9 s on pubmed_mini; now refused at once."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    query = " OR ".join(f'"{letters[i % 26]}* {letters[(i * 7 + 3) % 26]}*"' for i in range(64))
    assert len(query) == 700
    start = time.process_time()
    with pytest.raises(QuerySyntaxError, match="too expensive"):
        pubmed_mini.search(query)
    assert time.process_time() - start < 3
    # phrases of frequent words: 1000 of them took 12 s
    with pytest.raises(QuerySyntaxError, match="too expensive"):
        pubmed_mini.search(" OR ".join(['"of the"'] * 999))
    # specific wildcard phrases stay fine
    assert pubmed_mini.count('"aspirin* resist*" OR "warfarin* therap*"') > 0


def test_one_writer_thread_ranks_tied_documents_in_corpus_order(tmp_path):
    """Documents that tie on a query (here: all of them, identical text) rank in corpus order when one thread
    indexes them, the same on every build; the vendored indexes are built so (VENDORED_WRITER_THREADS)."""
    order = [f"d{(i * 37) % 300:03d}" for i in range(300)]  # not sorted: the corpus's order, not the ids'
    corpus = tmp_path / "ties.jsonl"
    corpus.write_text("".join(json.dumps({"id": d, "title": "knee pain", "text": "knee pain in adults"}) + "\n"
                              for d in order))
    rankings = []
    for i in range(2):
        meta = build_index(corpus, tmp_path / f"idx{i}", num_threads=1, progress=False)
        assert meta["writer_threads"] == 1
        hits = LocalSearchEngine(tmp_path / f"idx{i}").search("knee", k=300).hits
        assert len({h.score for h in hits}) == 1  # every document ties
        rankings.append([h.docid for h in hits])
    assert rankings[0] == rankings[1] == order


def test_vendored_index_is_rebuilt_when_built_with_several_threads(tmp_path, caplog):
    target = tmp_path / "trials_sigir"
    assert local_index.ensure_local_index("trials_sigir", target) == target
    meta = local_index.read_index_meta(target)
    assert meta["writer_threads"] == local_index.VENDORED_WRITER_THREADS == 1
    # an index from before (tantivy's own thread count, recorded as 0 or not at all) is rebuilt on first use
    path = target / INDEX_META_FILE
    path.write_text(json.dumps({k: v for k, v in meta.items() if k != "writer_threads"}))
    with caplog.at_level("INFO", logger="deepretrieval.search.local_index"):
        local_index.ensure_local_index("trials_sigir", target)
    assert "depends on their timing" in caplog.text
    assert local_index.read_index_meta(target)["writer_threads"] == 1
    caplog.clear()
    local_index.ensure_local_index("trials_sigir", target)  # up to date: kept
    assert "rebuilding" not in caplog.text and "building" not in caplog.text
