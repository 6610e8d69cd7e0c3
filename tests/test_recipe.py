"""The CPU recipe (deepretrieval.quickstart.recipe) and its warm-up targets: paired comparisons
from per-topic records against hand-computed values, the report, the command line."""

import json
from pathlib import Path

import pytest

from deepretrieval.eval.baselines import bag_of_words
from deepretrieval.quickstart import pipeline as qs
from deepretrieval.quickstart import recipe as rc

CASE = ("A 58-year-old nonsmoker white female with mild exertional dyspnea and occasional cough is found "
        "to have a left lung mass on chest x-ray.")


def test_random_word_targets_are_subsets_in_order_and_seeded():
    words = bag_of_words(CASE)
    targets = qs.random_word_targets(CASE, 50, seed=3)
    assert len(targets) == 50
    assert targets == qs.random_word_targets(CASE, 50, seed=3)  # deterministic
    assert targets != qs.random_word_targets(CASE, 50, seed=4)
    sizes = set()
    for query in targets:
        picked = query.split(" OR ")
        sizes.add(len(picked))
        assert len(set(picked)) == len(picked) and set(picked) <= set(words)
        assert [words.index(w) for w in picked] == sorted(words.index(w) for w in picked)  # the case's order
    assert sizes == set(range(2, 17))  # 2..16 words, every size drawn in 50 tries
    # never the whole case (the `original` baseline) when it has more words than max_words
    assert " OR ".join(words) not in targets
    assert qs.random_word_targets("", 3, seed=0) == []
    assert qs.random_word_targets("asthma", 2, seed=0) == ["asthma", "asthma"]


def test_warmup_queries_by_kind():
    assert qs.warmup_queries("question", ["heart failure"]) == [qs.warmup_targets("heart failure")]
    assert qs.warmup_queries("random_words", [CASE, "asthma"], seed=1) == [
        qs.random_word_targets(CASE, qs.WARMUP_PER_TOPIC, 1), qs.random_word_targets("asthma", qs.WARMUP_PER_TOPIC, 1)]
    with pytest.raises(ValueError, match="question, random_words, self"):
        qs.warmup_queries("expert", [CASE])
    with pytest.raises(ValueError, match="needs the model and the inputs' task kinds"):
        qs.warmup_queries("self", [CASE], kinds=["patient_trials"])  # no model


def test_consensus_terms_keep_what_an_inputs_answers_repeat_and_others_do_not():
    from deepretrieval.quickstart.self_warmup import consensus_terms

    answers = [
        ["The patient has lung cancer.", "Likely lung cancer, or a lung abscess.", "Patient: brain metastases"],
        ["The patient has asthma.", "patient asthma, COPD", "Asthma"],
        ["The patient is fine.", "The patient", "Nothing: the patient"],
        ["Patient has Lung disease", "patient", "Diabetes (type 2)"],
    ]
    # answers holding the word, per input: patient 2, lung 2, cancer 2 (ties: first seen first), has 1 ...;
    # asthma 3, patient 2; patient 3; patient 2, lung 1 ...
    # inputs whose answers hold the word: patient 4, has 3, lung 2, cancer 1, asthma 1
    assert consensus_terms(answers, min_count=2, max_share=0.5) == [["lung", "cancer"], ["asthma"], [], []]
    # a share of 1.0 keeps the question's echo; min_count 1 keeps every word once said
    assert consensus_terms(answers, min_count=2, max_share=1.0) == [["patient", "lung", "cancer"],
                                                                    ["asthma", "patient"], ["patient"], ["patient"]]
    assert consensus_terms(answers, min_count=3, max_share=0.25) == [[], ["asthma"], [], []]
    assert consensus_terms(answers, min_count=1, max_share=0.25, max_words=3) == [
        ["cancer", "likely", "abscess"], ["asthma", "copd"], ["fine", "nothing"], ["disease", "diabetes", "type"]]
    assert consensus_terms([]) == []


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from deepretrieval.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_self_targets_are_the_models_consistent_answers(tiny_dir, monkeypatch):
    from deepretrieval.quickstart import self_warmup as sw

    texts = [CASE, "Effect of statins on cardiovascular mortality", "asthma in children"]
    kinds = ["patient_trials", "review_question", "patient_trials"]
    seen = []
    real = sw.sample_answers

    def spy(model_path, inputs, task_kind, n, seed, **kw):
        seen.append((task_kind, list(inputs), n, seed))
        return real(model_path, inputs, task_kind, n, seed, **kw)

    monkeypatch.setattr(sw, "sample_answers", spy)
    targets = qs.warmup_queries("self", texts, seed=5, kinds=kinds, model_path=tiny_dir)
    # one batch of SELF_SAMPLES answers per input, per task kind; targets back in input order
    assert seen == [("patient_trials", [texts[0], texts[2]], sw.SELF_SAMPLES, 5),
                    ("review_question", [texts[1]], sw.SELF_SAMPLES, 5)]
    answers = real(tiny_dir, [texts[0], texts[2]], "patient_trials", sw.SELF_SAMPLES, 5)  # seeded: the same
    assert len(answers) == 2 and all(len(a) == sw.SELF_SAMPLES for a in answers)
    assert real(tiny_dir, [texts[0], texts[2]], "patient_trials", sw.SELF_SAMPLES, 6) != answers
    expected = sw.consensus_terms(answers)
    for per_input, words in zip([targets[0], targets[2]], expected):
        if not words:
            assert per_input == []
            continue
        assert len(per_input) == qs.WARMUP_PER_TOPIC and per_input[0] == " OR ".join(words)
        assert all(sorted(q.split(" OR ")) == sorted(words) for q in per_input)  # shuffles of the same words
    with pytest.raises(ValueError, match="not 'pico_trial'"):
        real(tiny_dir, [CASE], "pico_trial", 2, 0)


def test_self_targets_shuffle_the_consensus(monkeypatch):
    from deepretrieval.quickstart import self_warmup as sw

    canned = [["lung cancer", "lung cancer", "x"], ["nothing", "said", "twice"]] + [["patient"] * 3] * 6
    monkeypatch.setattr(sw, "sample_answers", lambda *a, **k: canned)
    targets = sw.self_targets("unused", ["a"] * 8, "patient_trials", 4, seed=0)
    assert targets[0][0] == "lung OR cancer" and sorted(targets[0]) == sorted(
        ["lung OR cancer"] + [q for q in targets[0][1:]]) and len(targets[0]) == 4
    assert set(targets[0]) <= {"lung OR cancer", "cancer OR lung"}
    assert targets[1:] == [[]] * 7  # nothing repeated; "patient" is in every input's answers


def _recs(label_scores, metric="recall@100"):
    return [{"topic_id": t, "error": "none" if v is not None else "format",
             "metrics": {metric: v if v is not None else 0.0, "recall@1000": 1.0, "ndcg@10": 0.5},
             "query": f"q{t}"} for t, v in label_scores.items()]


def test_comparison_pairs_topics_and_picks_the_best_other_baseline():
    records = {
        "original": _recs({"a": 0.2, "b": 0.4, "c": 0.0}),
        "gpt35_conditions": _recs({"a": 0.5, "b": 0.5, "c": 0.2}),
        "clinicians": _recs({"a": 0.3, "b": 0.3, "c": 0.3}),
        "warm-up, seed 1, sampled": _recs({"a": 0.1, "b": None, "c": 0.0}),
        "trained, seed 1, sampled": _recs({"a": 0.4, "b": 0.5, "c": 0.1}) + _recs({"a": 0.2, "b": 0.5, "c": 0.1}),
        "trained, seed 1, greedy": _recs({"a": 0.0, "b": 0.0, "c": 0.0}),
    }
    comp = rc.comparison(records, "trials_sigir", [1], n_resamples=500)
    assert comp["topics"] == ["a", "b", "c"]
    assert comp["best_other"] == "gpt35_conditions"  # mean 0.4 > clinicians 0.3
    # sampled: a topic scores the mean of its samples (a: 0.3, b: 0.5, c: 0.1)
    orig = comp["paired"]["trained, seed 1, sampled"]["original"]
    assert orig["mean"] == pytest.approx((0.1 + 0.1 + 0.1) / 3) and orig["n"] == 3
    assert orig["low"] >= 0.1 - 1e-9 and (orig["wins"], orig["losses"]) == (3, 0)  # every difference is 0.1
    gpt = comp["paired"]["trained, seed 1, sampled"]["gpt35_conditions"]
    assert gpt["mean"] == pytest.approx((-0.2 + 0.0 - 0.1) / 3) and (gpt["wins"], gpt["losses"]) == (0, 2)
    greedy = comp["paired"]["trained, seed 1, greedy"]["original"]
    assert greedy["mean"] == pytest.approx(-0.2) and (greedy["wins"], greedy["losses"]) == (0, 2)
    # what RL added: against the same seed's warm-up (its format error on b scores 0)
    rl = comp["paired"]["trained, seed 1, sampled"]["warm-up, seed 1, sampled"]
    assert rl["mean"] == pytest.approx((0.2 + 0.5 + 0.1) / 3) and rl["n"] == 3 and (rl["wins"], rl["losses"]) == (3, 0)
    assert "warm-up, seed 1, greedy" not in comp["paired"]["trained, seed 1, greedy"]  # no greedy warm-up scored
    assert comp["table"]["warm-up, seed 1, sampled"]["errors"] == {"format": 1}
    assert comp["table"]["warm-up, seed 1, sampled"]["recall@100"]["mean"] == pytest.approx(0.1 / 3)
    assert set(comp["table"]["original"]) == {"recall@100", "recall@1000", "ndcg@10", "errors"}
    text = rc.results_markdown("trials_sigir", comp, rc.query_examples(records, 1), {"steps": 3, "example_seed": 1},
                               {"1": 10.0})
    assert "| trained, seed 1, sampled | original | +0.100 [" in text and "| 3 / 0 |" in text
    assert "| a | 0.20 | `qa` (0.10) | `qa` (0.40) | `qa` (0.00) |" in text
    # an answer that did not parse shows its error class and the start of the response, not a query
    records["trained, seed 1, greedy"][1].update(query=None, error="format", response='<answer>{"query": "x OR x OR')
    text = rc.results_markdown("trials_sigir", comp, rc.query_examples(records, 1), {"example_seed": 1}, {})
    assert '| b | 0.40 | `qb` (0.00) | `qb` (0.50) | format: `<answer>{"query": "x OR x OR…` (0.00) |' in text
    assert "| trained, seed 1, sampled | 0.300 [" in text


def test_per_topic_leaves_out_infrastructure_failures():
    recs = [{"topic_id": "a", "error": "none", "metrics": {"recall@100": 0.5}},
            {"topic_id": "a", "error": "format", "metrics": {"recall@100": 0.0}},
            {"topic_id": "b", "error": "search_unavailable"}]
    assert rc.per_topic(recs, "recall@100") == {"a": 0.25}


def test_recipe_settings_and_command_line(capsys):
    assert rc.recipe_settings("trials_sigir", steps=5, warmup_kind=None)["steps"] == 5
    assert rc.recipe_settings("trials_sigir")["warmup_kind"] == "self"
    assert rc.recipe_settings("trials_sigir")["steps"] == 32
    # the soft overlong penalty over the last 24 of the 64 response tokens
    assert "reward_model.overlong_buffer.enable=true" in rc.recipe_settings("trials_sigir")["overrides"]
    assert "reward_model.overlong_buffer.len=24" in rc.recipe_settings("pubmed_mini")["overrides"]
    assert rc.recipe_settings("trials_sigir")["prompt_style"] == "expand"
    assert rc.recipe_settings("trials_sigir", prompt_style="compact")["prompt_style"] == "compact"
    with pytest.raises(ValueError, match="no CPU recipe"):
        rc.recipe_settings("pubmed")
    from deepretrieval.cli import main

    assert main(["recipe", "--task", "trials_sigir", "--out", "x", "not-an-override"]) == 2


def fake_run(run_dir, curve, kept_steps):
    """A seed's run folder as the trainer leaves it: the stage records, a metrics log with the validation
    recall of `curve` (step -> value; a later line of a step wins) and checkpoints of `kept_steps`."""
    from deepretrieval.trainer.checkpoint import HF_EXPORT_DIR, LATEST_FILE, step_dir_name

    state = qs.RunState(run_dir)
    state.mark("warmup", {"path": str(run_dir / "warmup")})
    state.mark("train", {"checkpoints": str(run_dir / "checkpoints")})
    (run_dir / "logs").mkdir(parents=True)
    lines = [{"step": step, "val/trials_sigir/recall_mean": value} for step, value in curve]
    lines.insert(1, {"step": 3, "critic/score/mean": 0.5})  # a training line: no validation
    (run_dir / "logs" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "{broken\n")
    for step in kept_steps:
        hf = run_dir / "checkpoints" / step_dir_name(step) / HF_EXPORT_DIR
        hf.mkdir(parents=True)
        (hf / "config.json").write_text("{}")
    (run_dir / "checkpoints" / LATEST_FILE).write_text(str(max(kept_steps)))


def test_best_step_is_the_earliest_of_the_highest_validation():
    assert rc.best_step([(0, 0.2), (8, 0.3), (16, 0.3), (24, 0.1)]) == 8
    assert rc.best_step([(0, 0.4), (8, 0.3)]) == 0
    with pytest.raises(ValueError, match="no validation"):
        rc.best_step([])


def test_trained_policy_by_last_step_or_by_validation(tmp_path):
    from deepretrieval.trainer.checkpoint import step_dir_name

    run = tmp_path / "seed1"
    # step 16's first validation line (0.9) was redone after a resume (0.25): the later line counts
    fake_run(run, [(0, 0.2), (8, 0.3), (16, 0.9), (16, 0.25), (24, 0.35), (32, 0.3)], kept_steps=[8, 16, 24, 32])
    assert rc.validation_curve(run, "trials_sigir") == [(0, 0.2), (8, 0.3), (16, 0.25), (24, 0.35), (32, 0.3)]
    assert rc.trained_policy(run, "trials_sigir", "last") == (32, str(run / "checkpoints"))
    assert rc.trained_policy(run, "trials_sigir", "validation") == (24, str(run / "checkpoints" / step_dir_name(24)))
    with pytest.raises(ValueError, match="select_step"):
        rc.trained_policy(run, "trials_sigir", "test")
    # the warm-up validated best: it is the policy tested
    warm = tmp_path / "seed2"
    fake_run(warm, [(0, 0.5), (8, 0.3), (16, 0.4)], kept_steps=[8, 16])
    assert rc.trained_policy(warm, "trials_sigir", "validation") == (0, str(warm / "warmup"))
    # the best step's checkpoint was pruned (max_actor_ckpt_to_keep=1): refused, with the override that keeps it
    pruned = tmp_path / "seed3"
    fake_run(pruned, [(0, 0.1), (8, 0.3), (16, 0.2)], kept_steps=[16])
    with pytest.raises(RuntimeError, match="max_actor_ckpt_to_keep=null"):
        rc.trained_policy(pruned, "trials_sigir", "validation")


def test_selecting_on_validation_needs_held_out_topics(tmp_path):
    with pytest.raises(ValueError, match="val_topics > 0"):
        rc.run_recipe("trials_sigir", [1], tmp_path / "r", select_step="validation", tiny=True)
    with pytest.raises(ValueError, match="select_step must be"):
        rc.run_recipe("trials_sigir", [1], tmp_path / "r", select_step="best", tiny=True)
    assert not (tmp_path / "r").exists()  # refused before anything ran


def res_records(out, name):
    path = out / "eval" / "samples" / "trials_sigir" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_ci_recipe_end_to_end_tiny(tmp_path, monkeypatch):
    """The recipe's whole path with the tiny model: one seed, one GRPO step on trials_sigir, the final
    evaluation next to the reference baselines, the paired intervals, the report and the curves."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "recipe"
    said = []
    res = rc.run_recipe("trials_sigir", [1], out, progress=False, images_dir=tmp_path / "images", say=said.append,
                        tiny=True, steps=1, test_freq=1, val_topics=4)
    comp = res["comparison"]
    assert len(comp["topics"]) == 12  # the held-out test topics of the fixed split
    # the trainer validated on 4 held-out training topics, not on the test topics, and did not train on them
    data = qs.RunState(out / "seed1").done("data")
    config = json.loads((out / "seed1" / "logs" / "config.json").read_text())
    assert config["data"]["val_files"] == data["val"] and (data["n_train"], data["n_val"]) == (32, 4)
    assert "validation recall@100 during training" in (out / "seed1" / "results.md").read_text().lower()
    table = comp["table"]
    assert list(table)[:5] == rc.REFERENCE_BASELINES["trials_sigir"]
    assert {rc.policy_label(stage, 1, d) for stage in ("warm-up", "trained") for d in rc.DECODINGS} <= set(table)
    # the final evaluation retrieves 1000; at @100 `original` and GPT-3.5's conditions score what a direct
    # search of these 12 topics gives (0.198, 0.400; docs/recipe.md), and @1000 can only be higher
    orig = table["original"]
    assert orig["recall@100"]["mean"] == pytest.approx(0.198, abs=0.001)
    assert orig["recall@1000"]["mean"] >= orig["recall@100"]["mean"] and orig["ndcg@10"]["n"] == 12
    assert table["gpt35_conditions"]["recall@100"]["mean"] == pytest.approx(0.400, abs=0.001)
    assert set(comp["paired"]) == {"trained, seed 1, greedy", "trained, seed 1, sampled",
                                   "trained, seed 1, greedy-norepeat"}
    assert set(comp["paired"]["trained, seed 1, greedy"]) == {"original", comp["best_other"], "warm-up, seed 1, greedy"}
    # greedy-norepeat: one query per topic, asked for with the recipe's n-gram rule, and none repeats a bigram
    spec = json.loads((out / "eval" / "samples" / "trials_sigir" / "trained_seed_1_greedy-norepeat.spec.json").read_text())
    assert spec["method"]["no_repeat_ngram_size"] == rc.NO_REPEAT_NGRAM == 2 and spec["method"]["n"] == 1
    assert len(res_records(out, "trained_seed_1_greedy-norepeat")) == 12
    # sampled: SAMPLES queries per topic
    sampled = res_records(out, "trained_seed_1_sampled")
    assert len(sampled) == 12 * rc.SAMPLES
    # the recipe's `expand` style: the checkpoint says so, and what a readable answer searched is the case's
    # words (the `original` baseline's query) OR the answer
    from deepretrieval.trainer.checkpoint import read_prompt_settings

    assert read_prompt_settings(qs.RunState(out / "seed1").done("warmup")["path"])["prompt_style"] == "expand"
    originals = {r["topic_id"]: r["query"] for r in res_records(out, "original")}
    for r in sampled:
        if r["query"] is not None and r["error"] in ("none", "query_syntax"):
            assert r["searched_query"] == f"({originals[r['topic_id']]}) OR ({r['query']})"
    text = (out / "results.md").read_text()
    assert "| trained, seed 1, sampled | original |" in text and "Queries before (warm-up) and after RL" in text
    assert "Prompt style `expand`" in text
    written = json.loads((out / "comparison.json").read_text())
    assert written["topics"] == comp["topics"] and (written["task"], written["fold"]) == ("trials_sigir", 0)
    # the per-topic scores are kept, so the run pools with other folds' (quickstart.pool); alone it is itself
    assert written["per_topic"]["original"] == pytest.approx({r["topic_id"]: r["metrics"]["recall@100"]
                                                             for r in res_records(out, "original")})
    from deepretrieval.quickstart.pool import pool_runs

    assert pool_runs([out])["paired"] == comp["paired"]
    # what it trained with is recorded (fold aside), so pooling can refuse runs of another recipe
    settings = written["settings"]
    assert settings == json.loads(json.dumps(rc.run_settings(rc.recipe_settings(
        "trials_sigir", steps=1, test_freq=1, val_topics=4), (), "hf", True)))
    assert (settings["steps"], settings["val_topics"], settings["tiny"]) == (1, 4, True) and "fold" not in settings
    assert "reward.recall_scale=5" in settings["overrides"]
    assert (tmp_path / "images" / "recipe_trials_sigir.png").stat().st_size > 5000
    assert (out / "seed1" / "stages" / "train.json").is_file()
    assert comp["trained_steps"] == {"1": 1} and "Trained policies: seed 1 step 1 (the last step)" in text
    # a rerun trains nothing again and gives the same comparison
    again = rc.run_recipe("trials_sigir", [1], out, progress=False, say=said.append, tiny=True, steps=1, test_freq=1,
                          val_topics=4)
    assert again["comparison"]["paired"] == comp["paired"]
    # selecting on validation: the step of the best validation recall@100 of the metrics log is the one tested
    best = rc.best_step(rc.validation_curve(out / "seed1", "trials_sigir"))
    picked = rc.run_recipe("trials_sigir", [1], out, progress=False, say=said.append, tiny=True, steps=1,
                           test_freq=1, val_topics=4, select_step="validation")
    assert picked["comparison"]["trained_steps"] == {"1": best}
    greedy = res_records(out, "trained_seed_1_greedy")
    spec = json.loads((out / "eval" / "samples" / "trials_sigir" / "trained_seed_1_greedy.spec.json").read_text())
    warm_dir = qs.RunState(out / "seed1").done("warmup")["path"]
    assert (spec["method"]["path"] == str(Path(warm_dir).resolve())) == (best == 0) and len(greedy) == 12


def test_recipe_script_passes_task_and_options(tmp_path):
    """code/scripts/recipe_cpu.sh: an optional task first, then the command's options (here --help)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "code" / "scripts" / "recipe_cpu.sh"
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    for args in (["--help"], ["pubmed_mini", "--help"]):
        out = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "usage: deepretrieval recipe" in out.stdout
    bad = subprocess.run(["bash", str(script), "pubmed", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'pubmed'" in bad.stderr
