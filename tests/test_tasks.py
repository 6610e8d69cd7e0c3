"""Task preparation: verl schema, splits, determinism, CLI."""

import json

import pandas as pd
import pytest

from deepretrieval.data import tasks
from deepretrieval.data import prompts
from deepretrieval.data.prompts import get_style


def _check_schema(row, data_source):
    assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert row["data_source"] == data_source and row["ability"] == tasks.ABILITY
    assert row["reward_model"]["style"] == "rule"
    target = row["reward_model"]["ground_truth"]["target"]
    assert target and all(isinstance(t, str) for t in target)
    assert [m["role"] for m in row["prompt"]] == ["user"]
    info = row["extra_info"]
    for key in ("split", "index", "topic_id", "pub_date", "prompt_style", "assistant_prefix", "think_in_prompt"):
        assert key in info
    assert info["n_targets"] == len(target)


@pytest.fixture
def leads_train(tmp_path):
    rows = [
        {"id": "publication_train-1", "pico": {"P": "Adults with asthma", "I": "ICS", "C": "placebo", "O": "FEV1"},
         "targets": ["123", "456"], "pub_date": "2010/05/01"},
        {"id": "publication_train-2", "pico": {"P": "Children", "I": "zinc", "C": "none", "O": "diarrhoea"},
         "targets": ["789"], "pub_date": "2001/01/01"},
        {"id": "broken", "pico": {"P": "x"}, "targets": []},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    return path


def test_pubmed_schema_with_input_and_pub_date(leads_train):
    splits = tasks.build_splits("pubmed", input=str(leads_train), max_test=30, val_size=5)
    assert len(splits["train"]) == 2  # the row without targets and the non-JSON line are skipped
    assert len(splits["test"]) == 30 and len(splits["val"]) == 5
    for split, rows in splits.items():
        for i, row in enumerate(rows):
            _check_schema(row, "pubmed")
            assert row["extra_info"]["split"] == split and row["extra_info"]["index"] == i
    by_id = {r["extra_info"]["topic_id"]: r for r in splits["train"]}
    row = by_id["publication_train-1"]
    assert row["extra_info"]["pub_date"] == "2010/05/01"
    assert row["reward_model"]["ground_truth"] == {"target": ["123", "456"]}
    assert row["prompt"][0]["content"].endswith("P: Adults with asthma\nI: ICS\nC: placebo\nO: FEV1")
    assert "PubMed Boolean syntax" in row["prompt"][0]["content"]
    # val rows are test rows
    test_ids = {r["extra_info"]["topic_id"] for r in splits["test"]}
    assert {r["extra_info"]["topic_id"] for r in splits["val"]} <= test_ids


def test_pubmed_without_training_split_writes_test_and_val(tmp_path):
    paths = tasks.prepare_task("pubmed", tmp_path, max_test=10, val_size=3)
    assert sorted(paths) == ["test", "val"]
    assert len(pd.read_parquet(paths["test"])) == 10


def test_ctgov_uses_vendored_splits(data_dir):
    splits = tasks.build_splits("ctgov", max_train=20, max_test=10, val_size=4)
    assert [len(splits[s]) for s in ("train", "test", "val")] == [20, 10, 4]
    raw = {r["id"]: r for r in tasks.read_jsonl(data_dir / "leads" / "trial_train.jsonl")}
    for row in splits["train"]:
        _check_schema(row, "ctgov")
        source = raw[row["extra_info"]["topic_id"]]
        assert row["reward_model"]["ground_truth"]["target"] == source["targets"]
        assert row["extra_info"]["pub_date"] == source["pub_date"]
        assert "ClinicalTrials.gov" in row["prompt"][0]["content"]


def test_pubmed_mini_topic_split(data_dir):
    splits = tasks.build_splits("pubmed_mini")
    topics = {t["topic_id"]: t for t in tasks.read_jsonl(data_dir / "pubmed_mini" / "topics.jsonl")}
    train = {r["extra_info"]["topic_id"] for r in splits["train"]}
    test = {r["extra_info"]["topic_id"] for r in splits["test"]}
    assert not train & test and train | test == set(topics)
    # stratified: each collection is in both splits, about a quarter in test
    for collection in ("cohen2006", "clef2017_dta"):
        n = sum(t["collection"] == collection for t in topics.values())
        n_test = sum(topics[t]["collection"] == collection for t in test)
        assert n_test == round(n * 0.25)
    assert {r["extra_info"]["topic_id"] for r in splits["val"]} == test  # val_size 100 > 9 test topics
    for row in splits["train"] + splits["test"]:
        _check_schema(row, "pubmed_mini")
        topic = topics[row["extra_info"]["topic_id"]]
        assert row["reward_model"]["ground_truth"]["target"] == topic["relevant"]
        assert row["prompt"][0]["content"].endswith(topic["title"])
        assert row["extra_info"]["collection"] == topic["collection"]


@pytest.mark.parametrize("task, sizes, untested", [
    ("trials_sigir", [12, 12, 12, 12], 0),  # one collection of 48: blocks of 12
    # cohen2006 11 topics: blocks of round(2.75) = 3, the last holds 2; clef2017_dta 17: blocks of round(4.25)
    # = 4, one topic in no block
    ("pubmed_mini", [7, 7, 7, 6], 1),
])
def test_folds_test_disjoint_topics_and_fold_0_is_the_split(task, sizes, untested):
    """The folds' test topics are disjoint, each fold trains on every other topic, and fold 0 is the split
    of every earlier run."""
    def ids(rows):
        return {r["extra_info"]["topic_id"] for r in rows}

    plain = tasks.build_splits(task)
    folds = [tasks.build_splits(task, fold=f) for f in range(len(sizes))]
    assert tasks.topic_folds(0.25) == len(sizes)
    assert ids(folds[0]["test"]) == ids(plain["test"]) and ids(folds[0]["train"]) == ids(plain["train"])
    every = ids(plain["train"]) | ids(plain["test"])
    tested = [ids(f["test"]) for f in folds]
    assert [len(t) for t in tested] == sizes
    assert len(set().union(*tested)) == sum(sizes) == len(every) - untested  # disjoint
    for f in folds:
        assert ids(f["train"]) == every - ids(f["test"])
    with pytest.raises(ValueError, match="fold must be 0 to 3"):
        tasks.build_splits(task, fold=len(sizes))
    with pytest.raises(ValueError, match="fixed train and test files"):
        tasks.build_splits("ctgov", fold=1, max_train=2, max_test=2)


def test_split_topics_blocks_by_hand():
    """10 topics in one collection, test_fraction 0.3: blocks of round(3.0) = 3 in the seeded order, 3 folds;
    the 10th topic of that order is in no block. A one-topic collection is never tested."""
    topics = [{"topic_id": f"t{i}", "collection": "a"} for i in range(10)] + [{"topic_id": "solo", "collection": "b"}]
    order = tasks._shuffled(sorted(f"t{i}" for i in range(10)), 7)
    assert tasks.topic_folds(0.3) == 3
    for fold in range(3):
        got = tasks.split_topics(topics, 0.3, 7, fold)
        assert sorted(t for t, s in got.items() if s == "test") == sorted(order[3 * fold: 3 * fold + 3])
        assert got["solo"] == "train" and got[order[9]] == "train"
    for bad_fraction in (0, 1, 1.5):
        with pytest.raises(ValueError, match="test_fraction"):
            tasks.split_topics(topics, bad_fraction, 7)


@pytest.mark.parametrize("task", ["trials_sigir", "pubmed_mini"])
def test_validation_topics_are_held_out_of_training(task):
    """val_from="train": the first val_size topics of the seeded training order become val.parquet and are
    not trained on; test is unchanged."""
    def ids(rows):
        return [r["extra_info"]["topic_id"] for r in rows]

    plain = tasks.build_splits(task)
    held = tasks.build_splits(task, val_from="train", val_size=4)
    train, val, test = (set(ids(held[s])) for s in ("train", "val", "test"))
    assert len(held["val"]) == len(val) == 4 and not (train & val or train & test or val & test)
    assert train | val == set(ids(plain["train"])) and ids(held["test"]) == ids(plain["test"])
    assert ids(held["val"]) == ids(plain["train"])[:4] and ids(held["train"]) == ids(plain["train"])[4:]
    assert [(r["extra_info"]["split"], r["extra_info"]["index"]) for r in held["val"]] == [("val", i) for i in range(4)]
    assert [r["extra_info"]["index"] for r in held["train"]] == list(range(len(train)))
    for bad in (0, len(plain["train"])):
        with pytest.raises(ValueError, match="holds out 1 to"):
            tasks.build_splits(task, val_from="train", val_size=bad)


def test_trials_sigir_targets_are_grade_at_least_one(data_dir):
    splits = tasks.build_splits("trials_sigir", style="no_reason")
    topics = {t["topic_id"]: t for t in tasks.read_jsonl(data_dir / "trials_sigir" / "topics.jsonl")}
    assert len(splits["train"]) + len(splits["test"]) == 48 and len(splits["test"]) == 12
    for row in splits["train"]:
        _check_schema(row, "trials_sigir")
        topic = topics[row["extra_info"]["topic_id"]]
        gt = row["reward_model"]["ground_truth"]
        # independent reference: the vendored `relevant` list
        assert sorted(gt["target"]) == sorted(topic["relevant"])
        assert tasks.judgements_from_ground_truth(gt) == topic["judgements"]
        assert row["extra_info"]["prompt_style"] == "no_reason" and not row["extra_info"]["think_in_prompt"]
        assert "<think>" not in row["prompt"][0]["content"]
        assert prompts.ENGINE_SYNTAX["local_trials"] in row["prompt"][0]["content"]


@pytest.mark.parametrize("task", ["pubmed_mini", "trials_sigir", "ctgov", "pubmed"])
def test_preparation_is_deterministic(task, tmp_path):
    options = {"max_train": 30, "max_test": 30, "val_size": 5}
    first = tasks.prepare_task(task, tmp_path / "a", **options)
    second = tasks.prepare_task(task, tmp_path / "b", **options)
    assert sorted(first) == sorted(second)
    for split in first:
        a, b = pd.read_parquet(first[split]), pd.read_parquet(second[split])
        assert a.to_json() == b.to_json()
    other = tasks.build_splits(task, seed=7, **options)
    ids = lambda rows: [r["extra_info"]["topic_id"] for r in rows]  # noqa: E731
    assert ids(other["test"]) != ids(tasks.build_splits(task, **options)["test"])


def test_parquet_round_trip_keeps_prompt_and_ground_truth(tmp_path):
    paths = tasks.prepare_task("trials_sigir", tmp_path)
    frame = pd.read_parquet(paths["train"])
    assert list(frame.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    row = frame.iloc[0]
    assert row["prompt"][0]["role"] == "user"
    assert row["extra_info"]["assistant_prefix"] == get_style("reasoning").assistant_prefix
    gt = row["reward_model"]["ground_truth"]
    assert len(gt["judged"]) == len(gt["grades"]) >= len(gt["target"])


def test_cli_prepare_and_example_script(tmp_path, capsys):
    import argparse

    from deepretrieval.data import cli

    parser = argparse.ArgumentParser(prog="deepretrieval")
    cli.register(parser.add_subparsers(dest="command"))

    def main(argv):
        args = parser.parse_args(argv)
        return args.func(args)

    assert main(["prepare", "--task", "pubmed_mini", "--out", str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["test.parquet", "train.parquet", "val.parquet"]
    assert main(["prepare", "--task", "pubmed", "--out", str(tmp_path / "x"), "--input", str(tmp_path / "missing")]) == 1
    assert main(["prepare", "--task", "trials_sigir", "--out", str(tmp_path / "f2"), "--fold", "2"]) == 0
    written = set(pd.read_parquet(tmp_path / "f2" / "test.parquet")["extra_info"].map(lambda e: e["topic_id"]))
    assert written == {r["extra_info"]["topic_id"] for r in tasks.build_splits("trials_sigir", fold=2)["test"]}
    assert main(["prepare", "--task", "trials_sigir", "--out", str(tmp_path / "f9"), "--fold", "9"]) == 1

    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "data_preprocess" / "literature_mining.py"
    spec = importlib.util.spec_from_file_location("literature_mining", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--task", "pubmed_mini", "--out", str(tmp_path / "ex"), "--seed", "3"]) == 0
    for split in ("train", "test", "val"):
        a = pd.read_parquet(tmp_path / "cli" / f"{split}.parquet")
        b = pd.read_parquet(tmp_path / "ex" / f"{split}.parquet")
        assert a.to_json() == b.to_json()


def test_raw_targets_in_both_spellings_and_original_order():
    from deepretrieval.data.tasks import original_order, raw_targets

    assert raw_targets({"targets": ["1"]}) == ["1"]
    assert raw_targets({"publication_pmids": ["2", "3"]}) == ["2", "3"]
    assert raw_targets({"pico": {}}) == []
    rows = [{"id": "x-10"}, {"id": "x-2"}, {"id": "x-0"}]
    assert [r["id"] for r in original_order(rows)] == ["x-0", "x-2", "x-10"]  # numeric, not text order
    mixed = [{"id": "b"}, {"id": "x-1"}]
    assert original_order(mixed) == mixed  # no numbering: file order
