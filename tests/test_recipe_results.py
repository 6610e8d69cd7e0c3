"""The recipe runs kept in results/recipe/ (docs/recipe.md reports them; `deepretrieval recipe-pool` pools them):
each is readable, tests the topics its fold tests today, and its `original` scores are what the vendored index
gives now, so the kept runs still compare with each other and with a new run (a changed split, corpus or engine
fails here, before a pooled comparison silently mixes them)."""

from pathlib import Path

import pytest

from deepretrieval.quickstart import pool as pl
from deepretrieval.quickstart import recipe as rc

RESULTS = Path(__file__).resolve().parents[1] / "results" / "recipe"
RUNS = sorted(p.parent for p in RESULTS.glob(f"*/*/{pl.COMPARISON_FILE}"))


def test_results_are_kept():
    assert RUNS, f"no run under {RESULTS}"
    for run in RUNS:
        assert (run / "results.md").is_file(), run


@pytest.mark.parametrize("run", RUNS, ids=[f"{r.parent.name}/{r.name}" for r in RUNS])
def test_a_kept_run_matches_the_code(run, tmp_path):
    from deepretrieval.eval.methods import BaselineMethod
    from deepretrieval.eval.runner import evaluate
    from deepretrieval.eval.samples import load_samples
    from deepretrieval.eval.searcher import Searcher

    comp = pl.load_comparison(run)
    assert comp["task"] == run.parent.name and comp["metric"] == f"recall@{rc.K}"
    assert comp.get("settings"), "comparison.json without its training settings"
    samples = load_samples(task=comp["task"], split="test", fold=comp["fold"])
    assert sorted({s.topic_id for s in samples}) == comp["topics"]
    records = evaluate(samples, BaselineMethod("original"), tmp_path, searcher=Searcher(k=rc.FINAL_K),
                       k=rc.FINAL_K, progress=False)
    assert rc.per_topic(records, comp["metric"]) == pytest.approx(comp["per_topic"]["original"], abs=1e-9)
    # every seed's trained policies, in every decoding, are scored on every test topic
    for seed in pl.run_seeds(comp):
        for decoding in rc.DECODINGS:
            assert set(comp["per_topic"][rc.policy_label("trained", seed, decoding)]) == set(comp["topics"])


def test_the_kept_runs_of_a_task_pool():
    for task in sorted({run.parent.name for run in RUNS}):
        runs = [run for run in RUNS if run.parent.name == task]
        res = pl.pool_runs(runs)
        assert res["task"] == task and res["settings_unrecorded"] == []
        assert len(res["topics"]) == sum(fold["topics"] for fold in res["runs"].values())
