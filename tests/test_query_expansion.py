"""The `expand` prompt style: the answer is searched added to the input's words, in the reward and in
evaluation alike (search.text.expanded_query, rewards.literature.searched_query)."""

import json

import pytest

from deepretrieval.data import prompts, tasks
from deepretrieval.eval.methods import Generation
from deepretrieval.eval.runner import score_generation
from deepretrieval.eval.samples import sample_from_row
from deepretrieval.eval.searcher import Searcher
from deepretrieval.rewards import literature
from deepretrieval.rewards.literature import compute_score, searched_query
from deepretrieval.rewards.manager import RewardManager
from deepretrieval.search.base import SearchEngine, SearchResult
from deepretrieval.search.local import LocalSearchEngine
from deepretrieval.search.local_index import build_index
from deepretrieval.search.text import expanded_query, or_query

CASE = "A 58-year-old woman with diabetes and chest pain. She has a history of hypertension."
CASE_WORDS = "58 OR year OR old OR woman OR diabetes OR chest OR pain OR she OR has OR history OR hypertension"


def test_expanded_query_hand_values():
    assert or_query(CASE) == CASE_WORDS  # stop words (a, with, and, of) dropped, first-seen order
    assert expanded_query(CASE, "diabetes OR angina") == f"({CASE_WORDS}) OR (diabetes OR angina)"
    # the written query keeps its own syntax inside its parentheses
    assert expanded_query("heart attack", "mi AND troponin") == "(heart OR attack) OR (mi AND troponin)"
    assert expanded_query("the of and", "x") == "x"  # no word survives: the query alone


def test_a_word_written_again_weighs_more_on_the_local_engine(tmp_path):
    # two documents that match the input equally; the expansion names one of them again
    corpus = tmp_path / "c.jsonl"
    docs = [{"id": "d1", "text": "angina pectoris"}, {"id": "d2", "text": "diabetes mellitus"}]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    build_index(corpus, tmp_path / "idx", progress=False)
    engine = LocalSearchEngine(tmp_path / "idx")
    plain = engine.search(or_query("angina diabetes"), k=2)
    assert plain.scores[0] == pytest.approx(plain.scores[1])  # a tie without expansion
    for extra, first in (("diabetes", "d2"), ("angina", "d1")):
        res = engine.search(expanded_query("angina diabetes", extra), k=2)
        assert res.ids[0] == first
        # the repeated clause adds that word's BM25 score once more: twice the tied score
        assert res.scores[0] == pytest.approx(2 * plain.scores[0], rel=1e-5)
        assert res.scores[1] == pytest.approx(plain.scores[1], rel=1e-5)
    # a word outside the input brings in a document the input's words miss
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs + [{"id": "d3", "text": "myocardial infarction"}]))
    build_index(corpus, tmp_path / "idx2", progress=False)
    engine = LocalSearchEngine(tmp_path / "idx2")
    assert "d3" not in engine.search(or_query("angina diabetes"), k=3).ids
    assert "d3" in engine.search(expanded_query("angina diabetes", "infarction"), k=3).ids


def test_expand_style_prompt_and_flags():
    text = prompts.build_user_content("patient_trials", CASE, "local", "expand")
    # the recipe's runs (docs/recipe.md) were trained on exactly this text
    assert prompts.EXPAND_INSTRUCTION["patient_trials"] == (
        "The search engine will look for this patient case's words. Write search terms to add to them that find "
        "more clinical trials this patient could join: the key conditions again to weigh them more, their medical "
        'names. Join terms with OR. Reply only with <answer>{"query": "..."}</answer>.')
    assert text == prompts.EXPAND_INSTRUCTION["patient_trials"] + "\n\nThe patient case is:\n" + CASE
    assert '<answer>{"query": "..."}</answer>' in text
    assert prompts.style_expands({"prompt_style": "expand"}) is True
    assert prompts.style_expands({"prompt_style": "compact"}) is False
    assert prompts.style_expands({"prompt_style": "unknown-style"}) is False and prompts.style_expands(None) is False
    assert prompts.get_style("expand").reasoning is False  # answer only, like compact
    with pytest.raises(ValueError, match="'expand' exists for the task kinds"):
        prompts.build_user_content("pico_publication", CASE, "pubmed", "expand")


class RecordingEngine(SearchEngine):
    name = "recording"

    def __init__(self, hits):
        self.hits, self.calls = hits, []

    def search(self, query, k=100, **filters):
        self.calls.append(query)
        ids = self.hits.get(query, [])[:k]
        return SearchResult(ids=ids, total=len(ids), query=query, k=k)


def _row(style):
    return {"data_source": "trials_sigir", "prompt": [{"role": "user", "content": "..."}],
            "reward_model": {"style": "rule", "ground_truth": {"target": ["1", "2", "3", "4"]}},
            "extra_info": {"topic_id": "t1", "prompt_style": style, "task_input": CASE, "think_in_prompt": False}}


@pytest.fixture
def engine():
    eng = RecordingEngine({f"({CASE_WORDS}) OR (diabetes)": ["1", "2", "9"], "diabetes": ["1"]})
    literature.set_engine("trials_sigir", eng)
    yield eng
    literature.set_engine("trials_sigir", None)


def test_reward_searches_the_expanded_query(engine):
    answer = '<answer>{"query": "diabetes"}</answer>'
    gt = {"target": ["1", "2", "3", "4"]}
    expanded = compute_score("trials_sigir", answer, gt, _row("expand")["extra_info"])
    assert engine.calls == [f"({CASE_WORDS}) OR (diabetes)"]
    assert expanded["query"] == engine.calls[0] and expanded["recall"] == 0.5
    plain = compute_score("trials_sigir", answer, gt, _row("compact")["extra_info"])
    assert engine.calls[-1] == "diabetes" and plain["recall"] == 0.25
    # a badly formatted answer is not searched, expanded or not
    bad = compute_score("trials_sigir", "diabetes", gt, _row("expand")["extra_info"])
    assert bad["error"] == "format" and len(engine.calls) == 2


def test_expand_row_without_its_input_is_a_classified_reward_error(engine):
    info = dict(_row("expand")["extra_info"])
    del info["task_input"]
    with pytest.raises(ValueError, match="no extra_info.task_input"):
        searched_query("diabetes", info)
    out = RewardManager(None).score_texts(['<answer>{"query": "diabetes"}</answer>'], ["trials_sigir"],
                                         [{"target": ["1"]}], [info])
    assert out[0]["error"] == "reward_error" and engine.calls == []


def test_evaluation_searches_what_the_reward_searches(engine):
    sample = sample_from_row(_row("expand"))
    searcher = Searcher(k=100, cache=False, engines={"trials_sigir": engine})
    answer = '<answer>{"query": "diabetes"}</answer>'
    rec = score_generation(sample, Generation(text=answer), searcher, ks=[100])
    assert rec["query"] == "diabetes" and rec["searched_query"] == f"({CASE_WORDS}) OR (diabetes)"
    assert rec["metrics"]["recall@100"] == 0.5
    # a checkpoint prompted in a style that does not expand (the generation says so) searches as written
    rec = score_generation(sample, Generation(text=answer, expands=False), searcher, ks=[100])
    assert "searched_query" not in rec and rec["metrics"]["recall@100"] == 0.25
    # and one prompted in `expand` on rows of another style expands
    compact = sample_from_row(_row("compact"))
    rec = score_generation(compact, Generation(text=answer, expands=True), searcher, ks=[100])
    assert rec["searched_query"] == engine.calls[-1] == f"({CASE_WORDS}) OR (diabetes)"
    # a baseline's query (given, not written in a style) is never expanded
    rec = score_generation(sample, Generation(query="diabetes"), searcher, ks=[100])
    assert engine.calls[-1] == "diabetes" and "searched_query" not in rec


def test_vendored_rows_in_expand_style_carry_their_input():
    splits = tasks.build_splits("trials_sigir", style="expand")
    row = splits["test"][0]
    assert row["extra_info"]["prompt_style"] == "expand"
    assert row["extra_info"]["task_input"] == tasks.row_task_input(row)
    assert row["prompt"][0]["content"].startswith(prompts.EXPAND_INSTRUCTION["patient_trials"])
    # the reward's searched query starts with the `original` baseline's query of the case
    assert searched_query("x", row["extra_info"]) == f"({or_query(row['extra_info']['task_input'])}) OR (x)"
