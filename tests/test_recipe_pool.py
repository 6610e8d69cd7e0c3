"""Pooling recipe runs of different folds (deepretrieval.quickstart.pool): the pooled paired comparison
against values computed by hand, the refusals, and the command line."""

import json
import random
import subprocess
import sys

import pytest

from deepretrieval.eval.metrics import paired_bootstrap_ci
from deepretrieval.quickstart import pool as pl
from deepretrieval.quickstart import recipe as rc

S1 = "trained, seed 1, sampled"
G1 = "trained, seed 1, greedy"


def _recs(scores):
    return [{"topic_id": t, "error": "none", "metrics": {"recall@100": v, "recall@1000": 1.0, "ndcg@10": 0.5},
             "query": f"q{t}"} for t, v in scores.items()]


def _run(fold, label_scores, seeds=(1, 2)):
    """A run's comparison.json contents, from records as the recipe computes them."""
    comp = rc.comparison({label: _recs(s) for label, s in label_scores.items()}, "trials_sigir", list(seeds),
                         n_resamples=300)
    comp.update(trained_steps={str(s): 32 for s in seeds}, select_step="last", fold=fold)
    return comp


FOLD_A = dict(original={"a1": 0.2, "a2": 0.4, "a3": 0.0},
              gpt4_conditions={"a1": 0.6, "a2": 0.6, "a3": 0.6},
              clinicians={"a1": 0.1, "a2": 0.1, "a3": 0.1})
FOLD_B = dict(original={"b1": 0.5, "b2": 0.1},
              gpt4_conditions={"b1": 0.0, "b2": 0.0},
              clinicians={"b1": 0.9, "b2": 0.9})


def _two_folds():
    a = _run(0, dict(FOLD_A, **{S1: {"a1": 0.3, "a2": 0.4, "a3": 0.2}, G1: {"a1": 0.0, "a2": 0.5, "a3": 0.0}}))
    b = _run(1, dict(FOLD_B, **{S1: {"b1": 0.6, "b2": 0.1}, G1: {"b1": 0.4, "b2": 0.1},
                                "trained, seed 2, sampled": {"b1": 0.9, "b2": 0.9}}))
    return a, b


def test_the_recipes_comparison_keeps_per_topic_scores():
    a, b = _two_folds()
    assert S1 == rc.policy_label("trained", 1, "sampled") and G1 == rc.policy_label("trained", 1, "greedy")
    assert a["task"] == "trials_sigir" and a["per_topic"][S1] == {"a1": 0.3, "a2": 0.4, "a3": 0.2}
    assert b["per_topic"]["original"] == FOLD_B["original"]


def test_pooled_differences_are_over_every_folds_topics():
    a, b = _two_folds()
    res = pl.pool([a, b], names=["A", "B"], n_resamples=500)
    assert res["topics"] == ["a1", "a2", "a3", "b1", "b2"]
    # sampled - original, by hand: a: +0.1, 0.0, +0.2; b: +0.1, 0.0
    s = res["paired"][S1]["original"]
    assert s["mean"] == pytest.approx(0.4 / 5) and s["n"] == 5 and (s["wins"], s["losses"]) == (3, 0)
    # the interval is the paired bootstrap over the 5 pooled topics, not a combination of per-fold intervals
    ref = paired_bootstrap_ci([0.3, 0.4, 0.2, 0.6, 0.1], [0.2, 0.4, 0.0, 0.5, 0.1], n_resamples=500)
    assert (s["low"], s["high"]) == pytest.approx((ref.low, ref.high))
    assert 0.0 <= s["low"] <= s["mean"] <= s["high"] <= 0.2
    # greedy: a: -0.2, +0.1, 0.0; b: -0.1, 0.0
    g = res["paired"][G1]["original"]
    assert g["mean"] == pytest.approx(-0.2 / 5) and (g["wins"], g["losses"]) == (1, 2)
    # the best other baseline by pooled mean: clinicians (0.3 + 1.8) / 5 = 0.42 > gpt4 1.8 / 5 = 0.36,
    # though gpt4 is the better one on fold A
    assert a["best_other"] == "gpt4_conditions" and b["best_other"] == "clinicians"
    assert res["best_other"] == "clinicians"
    assert res["table"]["clinicians"]["mean"] == pytest.approx(0.42)
    c = res["paired"][S1]["clinicians"]
    assert c["mean"] == pytest.approx((0.2 + 0.3 + 0.1 - 0.3 - 0.8) / 5) and (c["wins"], c["losses"]) == (3, 2)
    # seed 2 is only in fold B: listed, not pooled over fewer folds
    assert "trained, seed 2, sampled" not in res["paired"] and res["missing"] == ["trained, seed 2, sampled"]
    assert res["runs"] == {"A": {"fold": 0, "topics": 3, "seeds": [1], "runs": ["A"]},
                           "B": {"fold": 1, "topics": 2, "seeds": [1, 2], "runs": ["B"]}}
    text = pl.pool_markdown(res)
    assert "5 test topics from 2 folds" in text and f"| {S1} | original | +0.080 [" in text and "| 3 / 0 |" in text
    assert res["seeds_missing_from"] == {2: ["fold 0"]}
    assert "Not pooled, not in every fold: seed 2 (no run of fold 0)." in text


def test_what_a_fold_lacks_is_named_by_seed_or_by_policy():
    """A seed some fold has no run of is named once; a decoding missing from a fold that ran the seed (an older
    run's final evaluation without it) is named by itself, with the fold."""
    a, b = _two_folds()
    n1 = "trained, seed 1, greedy-norepeat"
    b["per_topic"][n1] = {"b1": 0.5, "b2": 0.2}
    res = pl.pool([a, b], names=["A", "B"], n_resamples=200)
    assert res["missing"] == [n1, "trained, seed 2, sampled"] and n1 not in res["paired"]
    assert res["missing_from"] == {n1: ["fold 0"], "trained, seed 2, sampled": ["fold 0"]}
    assert pl.missing_line(res["missing_from"], res["seeds_missing_from"]) == (
        f"Not pooled, not in every fold: seed 2 (no run of fold 0); {n1} (not in fold 0).")
    # runs without a fold number are named by their folder
    a.pop("fold"), b.pop("fold")
    res = pl.pool([a, b], names=["A", "B"], n_resamples=200)
    assert res["seeds_missing_from"] == {2: ["A"]} and res["missing_from"][n1] == ["A"]


def test_pooled_against_the_warm_up_is_what_rl_added():
    w1 = rc.policy_label("warm-up", 1, "sampled")
    a = _run(0, dict(FOLD_A, **{S1: {"a1": 0.3, "a2": 0.4, "a3": 0.2}, w1: {"a1": 0.3, "a2": 0.1, "a3": 0.4}}))
    b = _run(1, dict(FOLD_B, **{S1: {"b1": 0.6, "b2": 0.1}, w1: {"b1": 0.2, "b2": 0.1}}))
    res = pl.pool([a, b], n_resamples=500)
    rl = res["paired"][S1][w1]
    # trained - warm-up, by hand: a: 0.0, +0.3, -0.2; b: +0.4, 0.0
    assert rl["mean"] == pytest.approx(0.5 / 5) and rl["n"] == 5 and (rl["wins"], rl["losses"]) == (2, 1)
    ref = paired_bootstrap_ci([0.3, 0.4, 0.2, 0.6, 0.1], [0.3, 0.1, 0.4, 0.2, 0.1], n_resamples=500)
    assert (rl["low"], rl["high"]) == pytest.approx((ref.low, ref.high))
    assert f"| {S1} | {w1} | +0.100 [" in pl.pool_markdown(res)
    # the forest plot's rows: every trained policy against `original` and its own warm-up, not the other baseline
    assert [(label, against) for label, against, _ in pl.forest_rows(res)] == [(S1, "original"), (S1, w1)]
    assert pl.forest_rows(res)[1][2] == rl
    # a warm-up not scored in every fold is not pooled, and no trained policy is compared with it
    b_without = _run(1, dict(FOLD_B, **{S1: {"b1": 0.6, "b2": 0.1}}))
    partial = pl.pool([a, b_without], n_resamples=300)
    assert set(partial["paired"][S1]) == {"original", "clinicians"} and partial["missing"] == [w1]


def test_one_run_pooled_is_the_runs_own_comparison():
    rng = random.Random(3)
    topics = [f"t{i}" for i in range(12)]
    labels = {name: {t: round(rng.random(), 3) for t in topics}
              for name in ("original", "gpt35_conditions", "clinicians", S1, G1)}
    comp = _run(2, labels)
    res = pl.pool([comp], n_resamples=300)
    assert res["best_other"] == comp["best_other"] and res["paired"] == comp["paired"]
    assert res["table"]["original"] == comp["table"]["original"]["recall@100"]


def test_refusals():
    a, b = _two_folds()
    with pytest.raises(ValueError, match="seed 1 is in both A and B"):
        pl.pool([a, a], names=["A", "B"])  # the same fold's seed twice
    overlap = _run(2, {"original": {"a3": 0.0, "c1": 0.5}, S1: {"a3": 0.1, "c1": 0.5}})
    with pytest.raises(ValueError, match="topic a3 is a test topic of both A and C, which test different topic sets"):
        pl.pool([a, overlap], names=["A", "C"])
    other = dict(b, task="pubmed_mini")
    with pytest.raises(ValueError, match="only runs of one task and metric pool"):
        pl.pool([a, other])
    with pytest.raises(ValueError, match="no runs"):
        pl.pool([])


def test_run_folders_and_the_command_line(tmp_path):
    a, b = _two_folds()
    for name, comp in (("fold0", a), ("fold1", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / pl.COMPARISON_FILE).write_text(json.dumps(comp))
    old = tmp_path / "old"
    old.mkdir()
    (old / pl.COMPARISON_FILE).write_text(json.dumps({k: v for k, v in a.items() if k != "per_topic"}))
    with pytest.raises(ValueError, match="no per-topic scores.*rerun the recipe's command"):
        pl.load_comparison(old)
    with pytest.raises(ValueError, match="not found"):
        pl.load_comparison(tmp_path / "nothing")
    out = tmp_path / "pooled" / "pool.md"
    cmd = [sys.executable, "-m", "deepretrieval.cli", "recipe-pool", str(tmp_path / "fold0"), str(tmp_path / "fold1"),
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"| {S1} | original | +0.080 [" in done.stdout and out.read_text() in done.stdout, done.stdout
    assert json.loads(out.with_suffix(".json").read_text())["paired"][S1]["original"]["n"] == 5
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(out.with_suffix(".png")) in done.stdout
    bad = subprocess.run(cmd[:4] + [str(old)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no per-topic scores" in bad.stderr


G2 = "trained, seed 2, greedy"
S2 = "trained, seed 2, sampled"


def _fold(fold, seeds, topics, baselines):
    """A run of `seeds` on one fold: the baselines' scores given, each seed's policies' drawn at random from a
    generator seeded by fold and seed (so a seed's scores are the same whichever run it is in)."""
    labels = dict(baselines)
    for seed in seeds:
        r = random.Random(1000 * fold + seed)
        for d in ("greedy", "sampled"):
            labels[rc.policy_label("trained", seed, d)] = {t: round(r.random(), 3) for t in topics}
    return _run(fold, labels, seeds)


def test_seeds_of_one_fold_from_separate_runs_merge():
    rng = random.Random(7)
    folds = {}
    for fold in (0, 1):
        topics = [f"f{fold}t{i}" for i in range(8)]
        folds[fold] = (topics, {name: {t: round(rng.random(), 3) for t in topics}
                                for name in ("original", "gpt35_conditions", "clinicians")})
    together = {f: _fold(f, [1, 2], *folds[f]) for f in folds}
    apart = {f: [_fold(f, [1], *folds[f]), _fold(f, [2], *folds[f])] for f in folds}
    assert rc.policy_seed(G2) == 2 and rc.policy_seed("original") is None
    assert pl.run_seeds(apart[0][1]) == [2] and pl.run_seeds(together[0]) == [1, 2]
    # one fold: its two one-seed runs give what the two-seed run gives, which is the run's own comparison
    one = pl.pool(apart[0], names=["s1", "s2"], n_resamples=300)
    assert one["paired"] == together[0]["paired"] and set(one["paired"]) == {G1, S1, G2, S2}
    assert one["runs"] == {"s1 + s2": {"fold": 0, "topics": 8, "seeds": [1, 2], "runs": ["s1", "s2"]}}
    # two folds, seeds in separate runs, in any order: the same pooled comparison as the two-seed runs
    both = pl.pool([together[0], together[1]], names=["f0", "f1"], n_resamples=300)
    mixed = pl.pool([apart[1][1], apart[0][0], apart[1][0], apart[0][1]], names=["f1s2", "f0s1", "f1s1", "f0s2"],
                    n_resamples=300)
    assert mixed["paired"] == both["paired"] and mixed["table"] == both["table"] and mixed["missing"] == []
    assert list(mixed["runs"]) == ["f1s2 + f1s1", "f0s1 + f0s2"] and len(mixed["topics"]) == 16
    # by hand: seed 2 sampled minus original over the 16 pooled topics
    by_hand = [apart[f][1]["per_topic"][S2][t] - folds[f][1]["original"][t] for f in folds for t in folds[f][0]]
    assert mixed["paired"][S2]["original"]["mean"] == pytest.approx(sum(by_hand) / 16)
    # a fold with only seed 1 leaves seed 2 out of the pooled rows
    partial = pl.pool([together[0], apart[1][0]], n_resamples=300)
    assert set(partial["paired"]) == {G1, S1} and partial["missing"] == [G2, S2]


def test_merging_a_fold_refuses_what_does_not_belong_together():
    rng = random.Random(8)
    topics = [f"t{i}" for i in range(6)]
    base = {"original": {t: round(rng.random(), 3) for t in topics}}
    s1, s2 = _fold(0, [1], topics, base), _fold(0, [2], topics, base)
    other_index = _fold(0, [2], topics, {"original": dict(base["original"], t3=0.999)})
    with pytest.raises(ValueError, match="'original' differs between s1 and s2x on 1 topic.*t3"):
        pl.pool([s1, other_index], names=["s1", "s2x"])
    with pytest.raises(ValueError, match="s2 says fold 3, s1 fold 0"):
        pl.pool([s1, dict(s2, fold=3)], names=["s1", "s2"])
    # training settings: equal ones pool, different ones are refused, missing ones are listed
    settings = rc.run_settings(rc.recipe_settings("trials_sigir"), (), "hf", False)
    ok = pl.pool([dict(s1, settings=settings), dict(s2, settings=dict(settings))], names=["s1", "s2"], n_resamples=200)
    assert ok["settings_unrecorded"] == []
    with pytest.raises(ValueError, match=r"s2 was trained with other settings than s1 \(rollout, steps\)"):
        pl.pool([dict(s1, settings=settings), dict(s2, settings=dict(settings, steps=16, rollout="vllm"))],
                names=["s1", "s2"])
    res = pl.pool([dict(s1, settings=settings), s2], names=["s1", "s2"], n_resamples=200)
    assert res["settings_unrecorded"] == ["s2"]
    assert "not checked against the others: s2." in pl.pool_markdown(res)
