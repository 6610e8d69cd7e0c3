"""`deepretrieval eval --topics FILE`: checking a user topics file, and recall on the vendored index
checked against a direct query of the index (set arithmetic by hand)."""

import argparse
import json

import pytest

from deepretrieval.eval.methods import BaselineMethod, Generation, QueryMethod
from deepretrieval.eval.runner import evaluate
from deepretrieval.eval.samples import load_samples
from deepretrieval.eval.searcher import Searcher
from deepretrieval.eval.topics import TopicsFileError, load_topic_samples, read_topics_file
from deepretrieval.search.local import LocalSearchEngine

UNKNOWN = "99999999999"  # no PMID of the vendored corpus


class FixedQuery(QueryMethod):
    """Writes the same query for every topic (what is searched is then known to the test)."""

    name = "fixed"

    def __init__(self, query):
        self.query = query

    def spec(self):
        return {"name": self.name, "query": self.query}

    def generate(self, samples):
        return [[Generation(query=self.query)] for _ in samples]


def write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_check_classifies_every_bad_line(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [
        {"topic_id": "a", "title": "statins and muscle pain", "relevant": ["1", 2]},  # 1: ok (ids as strings)
        "{not json",                                                              # 2: json
        "",                                                                       # blank: not a record
        {"topic_id": "b", "relevant": ["1"]},                                     # 4: missing_field title
        {"topic_id": "c", "title": "x", "relevant": "1"},                         # 5: bad_field
        {"topic_id": "a", "title": "again", "relevant": ["3"]},                   # 6: duplicate_topic
        {"topic_id": "d", "title": "nothing relevant", "relevant": []},           # 7: no_relevant
        [1, 2],                                                                   # 8: not_object
        {"topic_id": "e", "patient": "A 60-year-old man", "relevant": ["1"]},    # 9: missing_field (hint)
        {"topic_id": "f", "title": "kept", "relevant": ["4", UNKNOWN, "5"]},     # 10: ok, one unknown id
    ])
    check = read_topics_file(path, known_ids={"1", "2", "3", "4", "5"})
    assert check.corpus == "pubmed_mini" and check.lines == 9
    assert [t["topic_id"] for t in check.topics] == ["a", "f"]
    assert check.topics[0]["relevant"] == ["1", "2"]
    assert check.errors == {"json": 1, "missing_field": 2, "bad_field": 1, "duplicate_topic": 1,
                            "no_relevant": 1, "not_object": 1}
    lines = [m.split(": ")[0].rsplit(":", 1)[1] for m in check.messages]
    assert lines == ["2", "4", "5", "6", "7", "8", "9"]
    assert "looks like a trials_sigir topic" in check.messages[-1]
    assert (check.relevant_ids, check.unknown_ids, check.unknown_by_topic) == (5, 1, {"f": 1})
    assert any("1 of 5 relevant ids are not in the pubmed_mini corpus" in line for line in check.summary())


def test_trials_format_judgements_or_relevant_and_whole_file_errors(tmp_path):
    path = write_lines(tmp_path / "cases.jsonl", [
        {"topic_id": 1, "patient": "case one", "judgements": {"N1": 2, "N2": 0, "N3": 1}},
        {"topic_id": "2", "patient": "case two", "relevant": ["N4"]},
        {"topic_id": "3", "patient": "case three", "judgements": {"N1": "high"}},
    ])
    check = read_topics_file(path, known_ids={"N1", "N2", "N3"})
    assert check.corpus == "trials_sigir"
    assert [(t["topic_id"], t["relevant"]) for t in check.topics] == [("1", ["N1", "N3"]), ("2", ["N4"])]
    assert check.topics[1]["judgements"] == {"N4": 1}
    assert check.errors == {"bad_field": 1} and check.unknown_ids == 1
    with pytest.raises(TopicsFileError, match="no usable topic"):
        read_topics_file(write_lines(tmp_path / "bad.jsonl", ["{", {"topic_id": "x"}]), known_ids=set())
    with pytest.raises(TopicsFileError, match="cannot read"):
        read_topics_file(tmp_path / "missing.jsonl", known_ids=set())
    with pytest.raises(TopicsFileError, match="unknown corpus"):
        read_topics_file(path, corpus="pubmed", known_ids=set())


def test_recall_on_pubmed_mini_matches_a_direct_index_query(tmp_path, pubmed_mini_index):
    engine = LocalSearchEngine(pubmed_mini_index)
    ranked = engine.search("cholesterol", k=200).ids
    assert len(ranked) == 200
    # by hand: 3 of the top 100 found, one relevant id at rank 151 missed, one not in the corpus
    relevant = [ranked[0], ranked[4], ranked[60], ranked[150], UNKNOWN]
    path = write_lines(tmp_path / "mine.jsonl", [
        {"topic_id": "q1", "title": "Statins for primary prevention", "relevant": relevant},
        {"topic_id": "q2", "title": "Statins again", "relevant": [ranked[150]]},
    ])
    samples, check = load_topic_samples(path, corpus="pubmed_mini")
    assert check.unknown_ids == 1 and check.unknown_by_topic == {"q1": 1}
    assert [s.label for s in samples] == ["pubmed_mini:mine"] * 2 and samples[0].task == "pubmed_mini"
    searcher = Searcher(cache=False, engines={"pubmed_mini": engine})
    recs = evaluate(samples, FixedQuery("cholesterol"), tmp_path / "out", searcher=searcher, progress=False)
    assert [r["task"] for r in recs] == ["pubmed_mini:mine"] * 2
    assert recs[0]["ids"] == ranked[:100]
    assert recs[0]["metrics"]["recall@100"] == 3 / 5 and recs[0]["metrics"]["recall@10"] == 2 / 5
    assert recs[0]["metrics"]["precision@10"] == 2 / 10
    assert recs[1]["recall"] == 0.0
    # the `original` baseline writes its query from the topic's title; the index answers it directly
    recs = evaluate(samples[:1], BaselineMethod("original"), tmp_path / "out", searcher=searcher, progress=False)
    direct = engine.search(recs[0]["query"], k=100).ids
    assert recs[0]["ids"] == direct
    assert recs[0]["recall"] == len(set(direct) & set(relevant)) / len(relevant)


def test_vendored_topics_file_gives_the_vendored_split_numbers(tmp_path, data_dir, trials_sigir_index):
    engine = LocalSearchEngine(trials_sigir_index)
    searcher = Searcher(cache=False, engines={"trials_sigir": engine})
    own, _ = load_topic_samples(data_dir / "trials_sigir" / "topics.jsonl")
    vendored = load_samples("trials_sigir", split="all")
    a = evaluate(own, BaselineMethod("clinicians"), tmp_path / "a", searcher=searcher, progress=False)
    b = evaluate(vendored, BaselineMethod("clinicians"), tmp_path / "b", searcher=searcher, progress=False)
    assert len(a) == len(b) == 4 * 48
    assert {r["key"]: r["metrics"] for r in a} == {r["key"]: r["metrics"] for r in b}
    # a re-run of the vendored split reuses every record (its topics' digests are stable)
    assert evaluate(load_samples("trials_sigir", split="all"), BaselineMethod("clinicians"), tmp_path / "b",
                    searcher=searcher, progress=False) == b


def test_cli_topics_for_a_baseline(tmp_path, pubmed_mini_index, capsys):
    from deepretrieval.eval.cli import register

    engine = LocalSearchEngine(pubmed_mini_index)
    ranked = engine.search("cholesterol", k=100).ids
    path = write_lines(tmp_path / "mine.jsonl", [
        {"topic_id": "q1", "title": "cholesterol", "relevant": ranked[:2] + [UNKNOWN]},
        "{broken",
    ])
    config = tmp_path / "reward.json"
    config.write_text(json.dumps({"pubmed_mini": {"index_dir": str(pubmed_mini_index)}}))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["eval", "--topics", str(path), "--index", "pubmed_mini", "--baseline", "original",
                              "--reward-config", str(config), "--search-cache", "none", "--out", str(out),
                              "--bootstrap", "100", "--no-plot"])
    assert args.func(args) == 0
    rec = json.loads((out / "samples" / "pubmed_mini_mine" / "original.jsonl").read_text().splitlines()[0])
    direct = engine.search(rec["query"], k=100).ids
    assert rec["recall"] == len(set(direct) & set(ranked[:2] + [UNKNOWN])) / 3 == 2 / 3
    check = json.loads((out / "topics" / "pubmed_mini_mine.check.json").read_text())
    assert check["errors"] == {"json": 1} and check["unknown_ids"] == 1 and check["topics"] == 1
    assert "pubmed_mini:mine" in capsys.readouterr().out
    bad = parser.parse_args(["eval", "--topics", str(tmp_path / "none.jsonl"), "--baseline", "original",
                             "--out", str(out)])
    assert bad.func(bad) == 1


def test_suite_labels_stay_apart_when_stems_collide(tmp_path):
    from hashlib import sha256

    from deepretrieval.eval.topics import suite_label

    taken = {}
    dev, test = tmp_path / "dev" / "topics.jsonl", tmp_path / "test" / "topics.jsonl"
    assert suite_label("pubmed_mini", dev, taken) == "pubmed_mini:topics"
    # by hand: the first 8 hex digits of the resolved path's SHA-256
    digest = sha256(str(test.resolve()).encode()).hexdigest()[:8]
    assert suite_label("pubmed_mini", test, taken) == f"pubmed_mini:topics-{digest}"
    # another corpus: another folder, no hash (the vendored files given together keep their labels)
    assert suite_label("trials_sigir", tmp_path / "cases" / "topics.jsonl", taken) == "trials_sigir:topics"
    # `my topics` and `my_topics` would share the folder pubmed_mini_my_topics
    assert suite_label("pubmed_mini", tmp_path / "my topics.jsonl", taken) == "pubmed_mini:my topics"
    assert suite_label("pubmed_mini", tmp_path / "my_topics.jsonl", taken).startswith("pubmed_mini:my_topics-")
    with pytest.raises(TopicsFileError, match="given twice"):
        suite_label("pubmed_mini", tmp_path / "dev" / ".." / "dev" / "topics.jsonl", taken)


def test_runner_refuses_two_suites_in_one_record_folder(tmp_path, pubmed_mini_index):
    path = write_lines(tmp_path / "a.jsonl", [{"topic_id": "q1", "title": "statins", "relevant": ["1"]}])
    samples, _ = load_topic_samples(path, corpus="pubmed_mini")
    other, _ = load_topic_samples(path, corpus="pubmed_mini")
    samples[0].suite, other[0].suite = "pubmed_mini:my topics", "pubmed_mini:my_topics"
    searcher = Searcher(cache=False, engines={"pubmed_mini": LocalSearchEngine(pubmed_mini_index)})
    with pytest.raises(ValueError, match="share the record folder 'pubmed_mini_my_topics'"):
        evaluate(samples + other, FixedQuery("statins"), tmp_path / "out", searcher=searcher, progress=False)


def test_cli_two_topics_files_with_one_name_are_two_columns(tmp_path, pubmed_mini_index, capsys):
    from hashlib import sha256

    from deepretrieval.eval.cli import register

    engine = LocalSearchEngine(pubmed_mini_index)
    ranked = engine.search("cholesterol", k=100).ids
    (tmp_path / "dev").mkdir()
    (tmp_path / "test").mkdir()
    # the same topic_id in both files, with other relevant ids: each file's own are scored
    dev = write_lines(tmp_path / "dev" / "topics.jsonl",
                      [{"topic_id": "q1", "title": "cholesterol", "relevant": ranked[:2]}])
    test = write_lines(tmp_path / "test" / "topics.jsonl",
                       [{"topic_id": "q1", "title": "cholesterol", "relevant": [ranked[0], UNKNOWN]}, "{broken"])
    config = tmp_path / "reward.json"
    config.write_text(json.dumps({"pubmed_mini": {"index_dir": str(pubmed_mini_index)}}))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["eval", "--topics", str(dev), "--topics", str(test), "--baseline", "original",
                              "--reward-config", str(config), "--search-cache", "none", "--out", str(out),
                              "--bootstrap", "100", "--no-plot"])
    assert args.func(args) == 0
    second = f"pubmed_mini_topics-{sha256(str(test.resolve()).encode()).hexdigest()[:8]}"
    first_rec = json.loads((out / "samples" / "pubmed_mini_topics" / "original.jsonl").read_text())
    second_rec = json.loads((out / "samples" / second / "original.jsonl").read_text())
    # the query `cholesterol` ranks ranked[0] and ranked[1] in its top 100: 2/2 and 1/2
    assert (first_rec["recall"], second_rec["recall"]) == (1.0, 0.5)
    assert json.loads((out / "topics" / "pubmed_mini_topics.check.json").read_text())["errors"] == {}
    assert json.loads((out / "topics" / f"{second}.check.json").read_text())["errors"] == {"json": 1}
    table = capsys.readouterr().out
    assert "pubmed_mini:topics " in table or "pubmed_mini:topics |" in table
    assert second.replace("pubmed_mini_", "pubmed_mini:") in table
    twice = parser.parse_args(["eval", "--topics", str(dev), "--topics", str(dev), "--baseline", "original",
                               "--out", str(out)])
    assert twice.func(twice) == 1


class CountingQuery(FixedQuery):
    """FixedQuery that remembers which topics it wrote queries for."""

    def __init__(self, query):
        super().__init__(query)
        self.asked = []

    def generate(self, samples):
        self.asked.extend(s.topic_id for s in samples)
        return super().generate(samples)


def test_an_edited_topic_is_redone_and_the_others_reused(tmp_path, pubmed_mini_index):
    from deepretrieval.eval.runner import topic_digest

    engine = LocalSearchEngine(pubmed_mini_index)
    ranked = engine.search("cholesterol", k=100).ids
    searcher = Searcher(cache=False, engines={"pubmed_mini": engine})
    path = tmp_path / "mine.jsonl"
    t1 = {"topic_id": "t1", "title": "cholesterol", "relevant": [ranked[0], UNKNOWN]}
    t2 = {"topic_id": "t2", "title": "statins", "relevant": [ranked[1]]}
    write_lines(path, [t1, t2])
    method = CountingQuery("cholesterol")
    first = evaluate(load_topic_samples(path)[0], method, tmp_path / "out", searcher=searcher, progress=False)
    assert [r["recall"] for r in first] == [0.5, 1.0] and method.asked == ["t1", "t2"]
    # the same file again: nothing is redone (the digest is stable across loads)
    again = evaluate(load_topic_samples(path)[0], method, tmp_path / "out", searcher=searcher, progress=False)
    assert method.asked == ["t1", "t2"] and again == first
    # t1's relevant list fixed (same title, same fingerprint): t1 is redone, 1/1 by hand
    write_lines(path, [dict(t1, relevant=[ranked[0]]), t2])
    samples, _ = load_topic_samples(path)
    assert topic_digest(samples[0]) != first[0]["topic_digest"] and topic_digest(samples[1]) == first[1]["topic_digest"]
    fixed = evaluate(samples, method, tmp_path / "out", searcher=searcher, progress=False)
    assert method.asked == ["t1", "t2", "t1"] and [r["recall"] for r in fixed] == [1.0, 1.0]
    # a changed title alone also changes the topic (its prompt and the text the baselines read)
    write_lines(path, [dict(t1, relevant=[ranked[0]]), dict(t2, title="statins and myopathy")])
    evaluate(load_topic_samples(path)[0], method, tmp_path / "out", searcher=searcher, progress=False)
    assert method.asked == ["t1", "t2", "t1", "t2"]


def test_hostile_json_lines_are_counted_not_fatal(tmp_path):
    deep, huge = "[" * 50000, '{"topic_id": ' + "7" * 5000 + ', "title": "x", "relevant": ["1"]}'
    path = write_lines(tmp_path / "t.jsonl", [
        deep,                                                          # 1: RecursionError in json
        huge,                                                          # 2: ValueError (int-str limit)
        {"topic_id": "a", "title": "statins", "relevant": ["1"]},      # 3: ok
    ])
    check = read_topics_file(path, known_ids={"1"})
    assert [t["topic_id"] for t in check.topics] == ["a"] and check.errors == {"json": 2}
    assert check.messages[0].startswith(f"{path}:1: json: RecursionError")
    assert check.messages[1].startswith(f"{path}:2: json: ValueError")
    for name, text in (("deep.json", deep), ("huge.json", "[" + huge + "]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(TopicsFileError, match="not a JSON array"):
            read_topics_file(tmp_path / name, known_ids={"1"})


def test_extra_keys_of_the_wrong_type_are_bad_fields(tmp_path):
    pubmed = write_lines(tmp_path / "p.jsonl", [
        {"topic_id": "a", "title": "statins", "relevant": ["1"], "boolean_query": ["a"]},     # 1: bad_field
        {"topic_id": "b", "title": "statins", "relevant": ["1"], "collection": 7},            # 2: bad_field
        {"topic_id": "c", "title": "statins", "relevant": ["1"], "collection": "CLEF2017",
         "boolean_query": None},                                                             # 3: ok
        {"topic_id": "d", "title": "statins", "relevant": ["1"], "boolean_query": "statin*"},  # 4: ok
    ])
    check = read_topics_file(pubmed, known_ids={"1"})
    assert [t["topic_id"] for t in check.topics] == ["c", "d"] and check.errors == {"bad_field": 2}
    assert "'boolean_query' must be a string or null, not list" in check.messages[0]
    assert "'collection' must be a string or null, not int" in check.messages[1]
    case = {"patient": "a 60-year-old man", "judgements": {"N1": 1}}
    trials = write_lines(tmp_path / "t.jsonl", [
        dict(case, topic_id="1", reference_queries="x"),                                       # bad_field
        dict(case, topic_id="2", reference_queries={"Clinician_A": "lung mass"}),              # bad_field
        dict(case, topic_id="3", reference_queries={"gpt-4-turbo": {"conditions": [1]}}),      # bad_field
        dict(case, topic_id="4", reference_queries={"gpt-35-turbo": ["Lung Neoplasms"]}),      # bad_field
        dict(case, topic_id="5", reference_queries={"human_summary": ["x"]}),                  # bad_field
        dict(case, topic_id="6", reference_queries={"Clinician_B": ["lung mass"], "human_summary": "lung",
                                                    "gpt-4-turbo": {"conditions": ["Lung Neoplasms"]}}),  # ok
    ])
    check = read_topics_file(trials, known_ids={"N1"})
    assert [t["topic_id"] for t in check.topics] == ["6"] and check.errors == {"bad_field": 5}
    assert "'reference_queries' must be an object, not str" in check.messages[0]
    # what is kept builds its samples and baseline queries (no AttributeError on the way)
    samples, _ = load_topic_samples(pubmed, corpus="pubmed_mini")
    assert [s.example_query for s in samples] == [None, "statin*"]
    from deepretrieval.eval.baselines import baseline_query

    samples, _ = load_topic_samples(trials, corpus="trials_sigir")
    assert samples[0].example_query == "(lung OR neoplasms)"
    assert baseline_query("clinicians", samples[0]) == [None, "lung OR mass", None, None]
    assert baseline_query("human_summary", samples[0]) == "lung"
