"""The tiered recall reward: parsing, format checks, tiers, recall, date filter, configuration."""

import json
import threading

import pytest

from deepretrieval.rewards import literature
from deepretrieval.rewards.literature import RewardConfig, compute_score, tier_reward
from deepretrieval.rewards.parsing import check_format, parse_answer
from deepretrieval.search.base import QuerySyntaxError, SearchEngine, SearchResult, SearchUnavailable
from deepretrieval.search.metrics import recall_at_k


class FakeEngine(SearchEngine):
    """query -> ids; chosen queries raise; `dates` (id -> "YYYY/MM/DD") makes max_date filter."""

    name = "fake"

    def __init__(self, results, syntax_errors=(), unavailable=(), dates=None):
        self.results = results
        self.syntax_errors = set(syntax_errors)
        self.unavailable = set(unavailable)
        self.dates = dates or {}
        self.calls = []
        self._lock = threading.Lock()

    def search(self, query, k=100, **filters):
        with self._lock:
            self.calls.append((query, k, dict(filters)))
        if query in self.syntax_errors:
            raise QuerySyntaxError("unbalanced parenthesis", position=0, query=query)
        if query in self.unavailable:
            raise SearchUnavailable("HTTP 503 after 3 retries")
        ids = list(self.results.get(query, []))
        if "max_date" in filters:
            ids = [d for d in ids if self.dates.get(d, "0000/00/00") <= filters["max_date"]]
        return SearchResult(ids=ids[:k], total=len(ids), query=query, engine=self.name, k=k)


def answer(query_json, think=True):
    body = f"<answer>{query_json}</answer>"
    return ("I should search for both drugs.\n</think>\n" + body) if think else body


THINK_INFO = {"think_in_prompt": True, "prompt_style": "reasoning"}


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, query",
    [
        ('<answer>{"query": "aspirin AND stroke"}</answer>', "aspirin AND stroke"),
        ('<answer>\n```json\n{"query": "a OR b"}\n```\n</answer>', "a OR b"),
        ('<answer>```\n{"query": "a"}\n```</answer>', "a"),
        ('<answer>{"query": "x"}\nThis query covers both.</answer>', "x"),
        ("<answer>{'query': 'heart attack'}</answer>", "heart attack"),
        ("<answer>{'query': \"Crohn's disease\"}</answer>", "Crohn's disease"),
        ('<answer>{"query": "a",}</answer>', "a"),
        ('<answer>{"query": "a\n AND b"}</answer>', "a\n AND b"),
        ('<answer>Here it is: {"query": "  padded  "}</answer>', "padded"),
        ('<answer>{"query": "first"}</answer> then <answer>{"query": "last"}</answer>', "last"),
        ('<answer>{"query": "(a OR b) AND \\"c d\\""}</answer>', '(a OR b) AND "c d"'),
    ],
)
def test_parse_answer_tolerates_real_outputs(text, query):
    parsed = parse_answer(text)
    assert parsed.error == "none", parsed.detail
    assert parsed.query == query


@pytest.mark.parametrize(
    "text, error",
    [
        ("no tags at all", "format"),
        ('<answer>{"query": "unclosed"}', "format"),
        ("<answer>aspirin AND stroke</answer>", "json"),  # free text is never taken as a query
        ('<answer>{"q": "aspirin"}</answer>', "json"),
        ('<answer>{"query": ["a", "b"]}</answer>', "json"),
        ('<answer>["aspirin"]</answer>', "json"),
        ('<answer>{"query": "a"</answer>', "json"),
        ("<answer>{query: aspirin}</answer>", "json"),
        ('<answer>{"query": ""}</answer>', "empty_query"),
        ('<answer>{"query": "   \n "}</answer>', "empty_query"),
        (None, "format"),
    ],
)
def test_parse_answer_error_classes(text, error):
    parsed = parse_answer(text)
    assert parsed.error == error
    assert parsed.query is None


def test_format_counts_think_supplied_by_prompt():
    response = "reasoning here\n</think>\n<answer>{\"query\": \"a\"}</answer>"
    assert check_format(response, think_in_prompt=True) == (True, "")
    ok, reason = check_format(response, think_in_prompt=False)
    assert not ok and "<think> appears 0 times" in reason
    # the model re-opening <think> after the prompt opened it is two <think> tags
    ok, reason = check_format("<think>" + response, think_in_prompt=True)
    assert not ok and "<think> appears 2 times" in reason
    assert check_format("<think>" + response, think_in_prompt=False)[0]


@pytest.mark.parametrize(
    "response, ok",
    [
        ("<think>a</think><answer>b</answer>", True),
        ("<think>a</think>\nthen\n<answer>b</answer> trailing", True),
        ("<answer>b</answer><think>a</think>", False),
        ("<think>a<answer>b</answer></think>", False),
        ("<think>a</think><answer>b</answer><answer>c</answer>", False),
        ("<think>a</think><answer>b", False),
        ("</think><think>a<answer>b</answer>", False),
    ],
)
def test_format_tags_once_and_in_order(response, ok):
    assert check_format(response)[0] is ok


def test_format_without_reasoning_checks_answer_tags_only():
    assert check_format('<answer>{"query": "a"}</answer>', reasoning=False)[0]
    assert not check_format('<answer>{"query": "a"}</answer>', reasoning=True)[0]
    assert not check_format("<answer>a</answer><answer>b</answer>", reasoning=False)[0]


# ---------------------------------------------------------------- tiers and recall


@pytest.mark.parametrize(
    "recall, reward, tier",
    [
        (1.0, 5.0, 0.7),
        (0.7, 5.0, 0.7),
        (0.6999, 4.0, 0.5),
        (0.5, 4.0, 0.5),
        (0.4999, 3.0, 0.4),
        (0.4, 3.0, 0.4),
        (0.3999, 1.0, 0.3),
        (0.3, 1.0, 0.3),
        (0.2999, 0.5, 0.1),
        (0.1, 0.5, 0.1),
        (0.0999, 0.1, 0.05),
        (0.05, 0.1, 0.05),
        (0.0499, -3.5, 0.0),
        (0.0, -3.5, 0.0),
    ],
)
def test_tier_boundaries_are_inclusive(recall, reward, tier):
    assert tier_reward(recall) == (reward, tier)


def test_tier_reached_by_float_fractions():
    # 7/10, 3/10 and 1/20 computed in floating point still reach their tiers
    assert tier_reward(recall_at_k(list("abcdefg"), list("abcdefghij")))[0] == 5.0
    assert tier_reward(recall_at_k(list("abc"), list("abcdefghij")))[0] == 1.0
    assert tier_reward(recall_at_k(["t0"], [f"t{i}" for i in range(20)]))[0] == 0.1


def test_recall_against_hand_counted_fixture():
    targets = ["11", "22", "33", "44"]
    retrieved = ["99", "22", "11", "88", "44", "77"]
    assert recall_at_k(retrieved, targets) == 3 / 4
    assert recall_at_k(retrieved, targets, k=3) == 2 / 4  # 99, 22, 11
    assert recall_at_k(retrieved, targets, k=1) == 0.0
    assert recall_at_k(retrieved + ["22", "22"], targets) == 3 / 4  # duplicates count once
    assert recall_at_k([11, 22], targets) == 2 / 4  # ids compared as strings
    assert recall_at_k(retrieved, []) is None  # undefined: the evaluation leaves it out of means


def test_sample_without_targets_scores_recall_zero(engine):
    # the reward gives an undefined recall (no targets) the score of recall 0: below every tier
    result = compute_score("pubmed_mini", answer('{"query": "good"}'), {"target": []}, THINK_INFO, engine=engine)
    assert result["error"] == "none" and result["recall"] == 0.0 and result["tier"] == 0.0
    assert result["score"] == 1.0 + -3.5


# ---------------------------------------------------------------- compute_score


@pytest.fixture
def engine():
    return FakeEngine(
        {
            "good": ["1", "2", "3", "x", "y"],
            "half": ["1", "2", "z"],
            "none": ["z"],
        },
        syntax_errors={"bad ((syntax"},
        unavailable={"down"},
    )


GT = {"target": ["1", "2", "3", "4"]}


def test_score_recall_tiers(engine):
    result = compute_score("pubmed_mini", answer('{"query": "good"}'), GT, THINK_INFO, engine=engine)
    assert result["error"] == "none" and result["format_ok"]
    assert result["recall"] == 0.75 and result["n_retrieved"] == 5 and result["tier"] == 0.7
    assert result["score"] == 1 + 5
    half = compute_score("pubmed_mini", answer('{"query": "half"}'), GT, THINK_INFO, engine=engine)
    assert (half["recall"], half["score"]) == (0.5, 1 + 4)
    none = compute_score("pubmed_mini", answer('{"query": "none"}'), GT, THINK_INFO, engine=engine)
    assert (none["recall"], none["score"], none["tier"]) == (0.0, 1 - 3.5, 0.0)
    assert engine.calls == [("good", 100, {}), ("half", 100, {}), ("none", 100, {})]


def test_score_error_classes(engine):
    bad_format = compute_score("pubmed_mini", answer('{"query": "good"}', think=False), GT, THINK_INFO, engine=engine)
    assert bad_format["error"] == "format" and not bad_format["format_ok"]
    assert bad_format["score"] == -4.0 and bad_format["recall"] == 0.0
    assert bad_format["query"] == "good"  # logged, not searched
    assert engine.calls == []

    json_err = compute_score("pubmed_mini", answer("good AND stuff"), GT, THINK_INFO, engine=engine)
    assert (json_err["error"], json_err["score"], json_err["query"]) == ("json", 1 - 4.0, None)
    empty = compute_score("pubmed_mini", answer('{"query": " "}'), GT, THINK_INFO, engine=engine)
    assert (empty["error"], empty["score"]) == ("empty_query", -3.0)
    assert engine.calls == []

    syntax = compute_score("pubmed_mini", answer('{"query": "bad ((syntax"}'), GT, THINK_INFO, engine=engine)
    assert syntax["error"] == "query_syntax" and syntax["score"] == -3.0
    assert not syntax["search_unavailable"]
    assert "unbalanced parenthesis" in syntax["error_detail"]

    down = compute_score("pubmed_mini", answer('{"query": "down"}'), GT, THINK_INFO, engine=engine)
    assert down["error"] == "search_unavailable" and down["search_unavailable"]
    assert down["recall"] is None and down["score"] == 0.0


def test_unexpected_engine_exception_is_search_unavailable():
    class Broken(SearchEngine):
        def search(self, query, k=100, **filters):
            raise RuntimeError("index corrupted")

    result = compute_score("pubmed_mini", answer('{"query": "a"}'), GT, THINK_INFO, engine=Broken())
    assert result["error"] == "search_unavailable" and "index corrupted" in result["error_detail"]


def test_error_reported_inside_result_is_classified():
    class Reporting(SearchEngine):
        def search(self, query, k=100, **filters):
            return SearchResult.failed(QuerySyntaxError("unknown field tag", position=4), query=query)

    result = compute_score("pubmed_mini", answer('{"query": "a[xx]"}'), GT, THINK_INFO, engine=Reporting())
    assert result["error"] == "query_syntax" and result["score"] == -3.0


def test_recall_at_configured_k(engine):
    config = {"sources": {"pubmed_mini": {"engine": "local", "k": 2}}}
    result = compute_score("pubmed_mini", answer('{"query": "good"}'), GT, THINK_INFO, config=config, engine=engine)
    assert engine.calls[-1][1] == 2
    assert result["recall"] == 0.5 and result["n_retrieved"] == 2


def test_pubmed_honours_pub_date_as_max_date():
    dated = FakeEngine(
        {"q": ["1", "2", "3", "4"]},
        dates={"1": "1999/05/01", "2": "2004/01/01", "3": "2004/01/02", "4": "2010/12/31"},
    )
    info = dict(THINK_INFO, pub_date="2004/01/01")
    result = compute_score("pubmed", answer('{"query": "q"}'), GT, info, engine=dated)
    assert dated.calls == [("q", 3000, {"max_date": "2004/01/01"})]
    assert result["recall"] == 0.5  # 1 and 2 are on or before the review's date
    # ctgov does not filter by default; a source can turn it on
    compute_score("ctgov", answer('{"query": "q"}'), GT, info, engine=dated)
    assert dated.calls[-1] == ("q", 3000, {})
    cfg = {"ctgov": {"engine": "ctgov", "use_pub_date": True}}
    compute_score("ctgov", answer('{"query": "q"}'), GT, info, config=cfg, engine=dated)
    assert dated.calls[-1][2] == {"max_date": "2004/01/01"}


def test_no_reason_style_and_think_flag_from_config(engine):
    plain = '<answer>{"query": "good"}</answer>'
    info = {"prompt_style": "no_reason"}
    assert compute_score("pubmed_mini", plain, GT, info, engine=engine)["score"] == 6.0
    # the reasoning style needs the think block
    assert compute_score("pubmed_mini", plain, GT, {"prompt_style": "reasoning"}, engine=engine)["score"] == -4.0
    cfg = {"pubmed_mini": {"engine": "local", "think_in_prompt": True}}
    response = answer('{"query": "good"}')
    assert compute_score("pubmed_mini", response, GT, None, config=cfg, engine=engine)["format_ok"]
    assert not compute_score("pubmed_mini", response, GT, None, engine=engine)["format_ok"]


def test_ground_truth_as_numpy_array(engine):
    np = pytest.importorskip("numpy")
    gt = {"target": np.array(["1", "2", "3", "4"], dtype=object)}
    assert compute_score("pubmed_mini", answer('{"query": "good"}'), gt, THINK_INFO, engine=engine)["recall"] == 0.75


# ---------------------------------------------------------------- configuration


def test_default_config_reproduces_original():
    cfg = RewardConfig.from_config(None)
    s = cfg.scoring
    assert (s.format_score, s.format_penalty, s.below_tiers_score) == (1.0, -4.0, -3.5)
    assert s.tiers == ((0.7, 5.0), (0.5, 4.0), (0.4, 3.0), (0.3, 1.0), (0.1, 0.5), (0.05, 0.1))
    assert {n: cfg.source(n).k for n in ("pubmed", "ctgov", "pubmed_mini", "trials_sigir")} == {
        "pubmed": 3000,
        "ctgov": 3000,
        "pubmed_mini": 100,
        "trials_sigir": 100,
    }
    with pytest.raises(KeyError):
        cfg.source("unknown")


def test_config_overrides_global_and_per_source(engine):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "format_score": 0.5,
            "tiers": {"0.5": 2.0, "0.9": 10.0},
            "below_tiers_score": -1.0,
            "sources": {"pubmed_mini": {"engine": "local", "k": 50, "format_penalty": -2.0}},
            "pubmed": {"engine": "pubmed", "base_url": "http://127.0.0.1:9", "k": 10},
        }
    )
    parsed = RewardConfig.from_config(cfg)
    mini = parsed.source("pubmed_mini")
    assert mini.k == 50 and mini.scoring.format_penalty == -2.0 and mini.scoring.format_score == 0.5
    assert mini.scoring.tiers == ((0.9, 10.0), (0.5, 2.0))
    pubmed = parsed.source("pubmed")
    assert pubmed.k == 10 and dict(pubmed.engine_options) == {"base_url": "http://127.0.0.1:9"}
    assert pubmed.use_pub_date  # kept from the defaults
    result = compute_score("pubmed_mini", answer('{"query": "good"}'), GT, THINK_INFO, config=cfg, engine=engine)
    assert result["score"] == 0.5 + 2.0  # recall 0.75: tier 0.5 -> 2
    bad = compute_score("pubmed_mini", "nothing", GT, THINK_INFO, config=cfg, engine=engine)
    assert bad["score"] == -2.0


def test_recall_scale_replaces_the_tiers(engine):
    cfg = {"recall_scale": 5, "sources": {"pubmed_mini": {"engine": "local", "recall_scale": 2.0}}}
    assert RewardConfig.from_config({"recall_scale": 5}).scoring.recall_scale == 5.0
    assert RewardConfig.from_config(None).scoring.recall_scale is None
    # recall 0.75 (3 of the 4 targets): 1 (format) + 2 * 0.75, not the 0.5 tier's 4
    result = compute_score("pubmed_mini", answer('{"query": "good"}'), GT, THINK_INFO, config=cfg, engine=engine)
    assert result["score"] == pytest.approx(1.0 + 1.5) and result["tier"] is None
    # the penalties are unchanged
    assert compute_score("pubmed_mini", "nothing", GT, THINK_INFO, config=cfg, engine=engine)["score"] == -4.0


def test_engines_are_created_once_per_process(monkeypatch):
    created = []

    def factory(**options):
        created.append(options)
        return FakeEngine({"q": ["1"]})

    from deepretrieval.search import base

    monkeypatch.setitem(base.ENGINES, "fake_for_test", factory)
    cfg = {"sources": {"custom": {"engine": "fake_for_test", "k": 5, "flavour": "x"}}}
    try:
        for _ in range(3):
            r = compute_score("custom", answer('{"query": "q"}'), {"target": ["1"]}, THINK_INFO, config=cfg)
            assert r["recall"] == 1.0
        assert created == [{"flavour": "x"}]
    finally:
        literature.clear_engines()


# ---------------------------------------------------------------- with the real local engine


@pytest.fixture(scope="module")
def pubmed_mini_engine(pubmed_mini_index):
    from deepretrieval.search.local import LocalSearchEngine

    return LocalSearchEngine(pubmed_mini_index)


def test_local_engine_recall_hand_counted(pubmed_mini_engine):
    # three records by PMID: two of the four targets and one other record
    gt = {"target": ["10051933", "10053177", "10066996", "10072008"]}
    query = "10051933[pmid] OR 10053177[pmid] OR 11006[pmid]"
    result = compute_score("pubmed_mini", answer(json.dumps({"query": query})), gt, THINK_INFO, engine=pubmed_mini_engine)
    assert result["error"] == "none" and result["n_retrieved"] == 3
    assert result["recall"] == 0.5 and result["score"] == 1 + 4


def test_local_engine_syntax_error_is_models_fault(pubmed_mini_engine):
    result = compute_score("pubmed_mini", answer('{"query": "(aspirin AND"}'), GT, THINK_INFO, engine=pubmed_mini_engine)
    assert result["error"] == "query_syntax" and not result["search_unavailable"] and result["score"] == -3.0


def test_trials_phrase_recall_against_corpus_scan(trials_sigir_index, data_dir):
    import gzip
    import re

    from deepretrieval.search.local import LocalSearchEngine

    topics = tasks_topics(data_dir / "trials_sigir" / "topics.jsonl")
    topic = next(t for t in topics if len(t["relevant"]) >= 5)
    corpus = {}
    with gzip.open(data_dir / "trials_sigir" / "corpus.jsonl.gz", "rt") as handle:
        for line in handle:
            rec = json.loads(line)
            corpus[rec["nct_id"]] = rec["text"]
    tokens = lambda text: [w for w in re.split(r"[^0-9a-z]+", text.lower()) if w]  # noqa: E731
    phrase = tokens(corpus[topic["relevant"][0]])[:4]
    matches = set()
    for doc_id, text in corpus.items():
        words = tokens(text)
        if any(words[i : i + 4] == phrase for i in range(len(words) - 3)):
            matches.add(doc_id)
    assert 0 < len(matches) <= 100
    expected = len(matches & set(topic["relevant"])) / len(topic["relevant"])
    engine = LocalSearchEngine(trials_sigir_index)
    query = '"' + " ".join(phrase) + '"'
    result = compute_score("trials_sigir", answer(json.dumps({"query": query})), {"target": topic["relevant"]}, THINK_INFO, engine=engine)
    assert result["n_retrieved"] == len(matches)
    assert result["recall"] == pytest.approx(expected)


def tasks_topics(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_default_local_index_is_built_on_first_use(tmp_path, monkeypatch):
    from deepretrieval.search import local_index as paths

    monkeypatch.setenv("DEEPRETRIEVAL_CACHE_DIR", str(tmp_path))
    literature.clear_engines()
    assert paths.default_index_dir("trials_sigir") == tmp_path / "indexes" / "trials_sigir"
    try:
        result = compute_score("trials_sigir", answer('{"query": "NCT00001776[pmid]"}'), {"target": ["NCT00001776"]}, THINK_INFO)
        assert result["recall"] == 1.0
        meta = tmp_path / "indexes" / "trials_sigir" / paths.INDEX_META_FILE
        stamp = meta.stat().st_mtime_ns
        assert paths.ensure_local_index("trials_sigir") == meta.parent and meta.stat().st_mtime_ns == stamp
        with pytest.raises(ValueError, match="no vendored corpus"):
            paths.ensure_local_index("nosuch")
    finally:
        literature.clear_engines()


def test_configuration_errors_raise_but_missing_index_is_unavailable(tmp_path):
    with pytest.raises(ValueError, match="unknown search engine"):
        compute_score("x", answer('{"query": "a"}'), GT, THINK_INFO, config={"x": {"engine": "nosuch"}})
    cfg = {"pubmed_mini": {"engine": "local", "index_dir": str(tmp_path / "missing")}}
    try:
        result = compute_score("pubmed_mini", answer('{"query": "a"}'), GT, THINK_INFO, config=cfg)
        assert result["error"] == "search_unavailable" and result["search_unavailable"]
    finally:
        literature.clear_engines()


def test_strict_parser_accepts_only_one_json_document():
    from deepretrieval.rewards.parsing import parse_answer_strict

    assert parse_answer_strict('<answer> {"query": "a"} </answer>').query == "a"
    for block in ("{'query': 'a'}", '```json\n{"query": "a"}\n```', '{"query": "a",}', 'x {"query": "a"}',
                  '{"query": "a\nb"}', '{"query": "a"}{"query": "b"}'):
        parsed = parse_answer_strict(f"<answer>{block}</answer>")
        assert parsed.error == "json" and parse_answer(f"<answer>{block}</answer>").error == "none", block
    assert parse_answer_strict("<answer> </answer>").error == "empty_answer"
    assert parse_answer_strict("no tags").error == "format"
