"""One search path: the evaluation's searches and format flags are the reward's, so a response gets
the same query, filters, format verdict and recall in training and in evaluation."""

import pytest

from deepretrieval.eval.methods import Generation
from deepretrieval.eval.runner import score_generation
from deepretrieval.eval.samples import EvalSample
from deepretrieval.eval.searcher import Searcher
from deepretrieval.rewards.literature import compute_score
from deepretrieval.search.base import SearchEngine, SearchResult


class Recorder(SearchEngine):
    """Answers every query with the same ranked ids and records the filters it was given."""

    name = "recorder"

    def __init__(self, ids):
        self.ids, self.calls = ids, []

    def search(self, query, k=100, **filters):
        self.calls.append((query, k, dict(filters)))
        return SearchResult(ids=self.ids[:k], total=len(self.ids), query=query, engine=self.name, k=k)


TARGETS = ["1", "2", "3", "4"]


def sample(task, extra_info):
    row = {"data_source": task, "prompt": [], "extra_info": extra_info,
           "reward_model": {"ground_truth": {"target": TARGETS}}}
    return EvalSample(task=task, topic_id="t1", row=row, relevant=TARGETS)


@pytest.mark.parametrize("task, extra_info, response", [
    # live PubMed: searches limited to the row's publication date
    ("pubmed", {"pub_date": "2012/05/01", "prompt_style": "reasoning", "think_in_prompt": True},
     'thinking</think>\n<answer>{"query": "asthma AND steroids"}</answer>'),
    # the original's data source: its prompt opens <think>, which the reward's source says
    ("literature", {"pub_date": "2001/01/01"}, 'thinking</think>\n<answer>{"query": "copd"}</answer>'),
    # no_reason rows: no <think> block expected
    ("pubmed_mini", {"prompt_style": "no_reason"}, '<answer>{"query": "statin"}</answer>'),
])
def test_reward_and_evaluation_search_and_judge_alike(task, extra_info, response):
    reward_engine, eval_engine = Recorder(["9", "1", "8", "3"]), Recorder(["9", "1", "8", "3"])
    reward = compute_score(task, response, {"target": TARGETS}, extra_info, engine=reward_engine)
    searcher = Searcher(cache=False, engines={task: eval_engine})
    k = searcher.source(task).k
    rec = score_generation(sample(task, extra_info), Generation(text=response), searcher, [k], k)
    assert reward["format_ok"] is True and rec["format_ok"] is True
    assert reward_engine.calls == eval_engine.calls and len(eval_engine.calls) == 1
    assert (rec["query"], rec["recall"]) == (reward["query"], reward["recall"]) == (rec["query"], 2 / 4)
    if extra_info.get("pub_date") and task != "pubmed_mini":
        assert eval_engine.calls[0][2] == {"max_date": extra_info["pub_date"]}
    else:
        assert eval_engine.calls[0][2] == {}


def test_cached_search_key_holds_the_filters(tmp_path):
    engine = Recorder(["1", "2"])
    searcher = Searcher(cache=tmp_path / "cache.sqlite", engines={"pubmed": engine})
    early, late = sample("pubmed", {"pub_date": "2000/01/01"}), sample("pubmed", {"pub_date": "2020/01/01"})
    assert searcher.search(early, "q")[3] is False and searcher.search(early, "q")[3] is True
    assert searcher.search(late, "q")[3] is False  # another date limit: another cache entry
    assert [c[2] for c in engine.calls] == [{"max_date": "2000/01/01"}, {"max_date": "2020/01/01"}]
