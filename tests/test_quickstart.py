"""The quickstart pipeline (deepretrieval.quickstart.pipeline, .report): its pieces against hand-computed values, and
the shortened CI run end to end (tiny model, 2 GRPO steps on the Ray trainer): before/after table,
reward curve, resume."""

import json
import time

import pandas as pd
import pytest

from deepretrieval.quickstart import pipeline as qs
from deepretrieval.quickstart import report as rp


def test_compact_prompt_keeps_question_and_reward_fields():
    from deepretrieval.data.tasks import build_splits
    from deepretrieval.eval.samples import sample_from_row

    rows = build_splits("pubmed_mini", style="no_reason")["test"]
    compact = build_splits("pubmed_mini", style=qs.PROMPT_STYLE)["test"]
    assert len(compact) == len(rows) == 7
    style_keys = ("prompt_style", "assistant_prefix", "think_in_prompt")
    for old, new in zip(rows, compact):
        assert new["reward_model"] == old["reward_model"]
        assert {k: v for k, v in new["extra_info"].items() if k not in style_keys} == {
            k: v for k, v in old["extra_info"].items() if k not in style_keys}
        assert len(new["prompt"][0]["content"]) < len(old["prompt"][0]["content"]) / 2
        # the evaluation (baselines) reads the same question for both
        assert sample_from_row(new).need_text == sample_from_row(old).need_text == old["extra_info"]["task_input"]
    assert compact[0]["extra_info"]["prompt_style"] == "compact"
    assert compact[0]["extra_info"]["assistant_prefix"] == "" and not compact[0]["extra_info"]["think_in_prompt"]


def test_warmup_targets_from_the_question_only():
    q = "Rapid tests for the diagnosis of visceral leishmaniasis in patients with suspected disease"
    assert qs.warmup_targets(q) == [
        "Rapid tests for the diagnosis of visceral leishmaniasis in patients with suspected disease",
        "rapid OR tests OR diagnosis OR visceral OR leishmaniasis OR patients OR suspected OR disease",
    ]
    assert qs.warmup_targets("11C-PIB-PET (early)") == ["11C PIB PET early", "11c OR pib OR pet OR early"]
    assert qs.warmup_targets("") == []


def test_curves_and_table_from_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "val/pubmed_mini/recall_mean": 0.1},
        {"step": 1, "critic/score/mean": -1.0, "reward/recall_mean": 0.05, "reward/format_error_ratio": 0.5,
         "train/epoch": 0},
        {"step": 2, "critic/score/mean": 9.0, "reward/recall_mean": 0.9},
        {"step": 2, "critic/score/mean": 1.0, "reward/recall_mean": 0.2, "val/pubmed_mini/recall_mean": 0.3,
         "train/epoch": 0},
        {"step": 3, "critic/score/mean": 2.0, "reward/recall_mean": 0.4, "train/epoch": 1},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    c = rp.curves(rp.read_metrics(path))
    assert c["reward"] == [(1, -1.0), (2, 1.0), (3, 2.0)]  # the resumed step-2 line wins
    assert c["train_recall"] == [(1, 0.05), (2, 0.2), (3, 0.4)]
    assert c["epoch"] == [(1, 0), (2, 0), (3, 1)]
    assert c["test_recall"] == [(0, 0.1), (2, 0.3)]
    assert c["format_ok"] == [(1, 0.5)]
    evals = {"original (baseline)": {"recall": 0.286, "low": 0.2, "high": 0.35, "n": 7, "errors": {}},
             "m": {"recall": 0.0, "low": 0.0, "high": 0.0, "n": 7, "errors": {"format": 7}}}
    table = rp.results_table(evals, path)
    assert "| original (baseline) | 0.286 [0.200, 0.350] (n=7) | none |" in table
    assert "| m | 0.000 [0.000, 0.000] (n=7) | format 7 |" in table
    assert "| training (GRPO), per epoch | epoch 1 (2 steps) | epoch 2 (1 steps) |" in table
    assert "| reward, mean | 0.00 | 2.00 |" in table
    assert "| recall@100, mean | 0.125 | 0.400 |" in table
    assert "0: 0.100, 2: 0.300" in table
    png = rp.plot_reward_curve(path, tmp_path / "img" / "curve.png")
    assert png.stat().st_size > 5000


def test_run_stage_records_and_skips(tmp_path):
    state = qs.RunState(tmp_path)
    calls = []
    said = []
    first = qs.run_stage(state, "x", lambda: calls.append(1) or {"v": 1}, said.append)
    again = qs.run_stage(state, "x", lambda: calls.append(2) or {"v": 2}, said.append)
    assert calls == [1] and first["v"] == again["v"] == 1 and "seconds" in again
    assert any("skipped" in s for s in said)
    (state.dir / "y.json").write_text("{broken")  # a torn record counts as not done
    assert state.done("y") is None


def test_a_run_folder_keeps_its_prompt_style(tmp_path):
    with pytest.raises(ValueError, match="prompt_style must be one of compact, expand"):
        qs.run_quickstart(tmp_path / "run", prompt_style="reasoning", say=lambda s: None)
    state = qs.RunState(tmp_path / "run")
    state.mark("data", {"task": "trials_sigir", "prompt_style": "compact"})
    with pytest.raises(RuntimeError, match="trials_sigir run in the 'compact' prompt style"):
        qs.run_quickstart(tmp_path / "run", task="trials_sigir", prompt_style="expand", say=lambda s: None)
    state.mark("data", {"task": "trials_sigir", "prompt_style": "expand", "val_topics": 4})  # and its validation split
    with pytest.raises(RuntimeError, match="with 4 validation topics"):
        qs.run_quickstart(tmp_path / "run", task="trials_sigir", prompt_style="expand", say=lambda s: None)
    state.mark("data", {"task": "trials_sigir", "prompt_style": "expand", "val_topics": 0})  # and its fold (0 if unrecorded)
    with pytest.raises(RuntimeError, match="on fold 0"):
        qs.run_quickstart(tmp_path / "run", task="trials_sigir", prompt_style="expand", fold=2, say=lambda s: None)


def test_validation_topics_are_what_the_trainer_validates_on(tmp_path):
    data = qs.prepare_data(tmp_path, "trials_sigir", "expand", val_topics=4)
    assert (data["n_train"], data["n_val"], data["n_test"]) == (32, 4, 12) and data["val_topics"] == 4
    assert f"data.val_files={data['val']}" in qs.trainer_overrides(tmp_path, data, "/m", 2, False)
    assert qs.validation_name(data) == "validation"
    plain = qs.prepare_data(tmp_path / "plain", "trials_sigir", "expand")
    assert "val" not in plain and plain["n_train"] == 36 and qs.validation_name(plain) == "test"
    assert f"data.val_files={plain['test']}" in qs.trainer_overrides(tmp_path, plain, "/m", 2, False)
    fold = qs.prepare_data(tmp_path / "fold2", "trials_sigir", "expand", fold=2)
    assert fold["fold"] == 2 and (fold["n_train"], fold["n_test"]) == (36, 12)
    tested = [set(pd.read_parquet(d["test"])["extra_info"].map(lambda e: e["topic_id"])) for d in (plain, fold)]
    assert len(tested[0]) == len(tested[1]) == 12 and not tested[0] & tested[1]


def test_estimate_grows_with_steps():
    assert qs.estimate_seconds(16, False, 4) < 15 * 60  # the SmolLM2 default fits the promise
    assert qs.estimate_seconds(32, False, 4) - qs.estimate_seconds(16, False, 4) == pytest.approx(
        16 * qs.EST["smollm2"]["step"] + 4 * qs.EST["smollm2"]["val"])
    # every warm-up kind has its own estimate; the self warm-up's sampling is the slow one
    for est in qs.EST.values():
        assert set(est["warmup"]) == set(qs.WARMUP_KINDS)
    assert qs.estimate_seconds(16, False, 4, "self") - qs.estimate_seconds(16, False, 4, "question") == 330


def test_cli_parses_and_rejects_bad_override(capsys):
    from deepretrieval.cli import build_parser, main

    args = build_parser().parse_args(["quickstart", "--tiny", "--steps", "2", "trainer.seed=3"])
    assert args.tiny and args.steps == 2 and args.overrides == ["trainer.seed=3"]
    assert main(["quickstart", "--tiny", "notanoverride"]) == 2


def test_ci_quickstart_end_to_end_tiny(tmp_path, monkeypatch):
    """The shortened quickstart CI runs: tiny model, 2 GRPO steps with the Ray trainer."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    said = []
    start = time.perf_counter()
    res = qs.run_quickstart(out, tiny=True, steps=2, test_freq=2, progress=False,
                            images_dir=tmp_path / "images", say=said.append)
    first_s = time.perf_counter() - start
    assert said[0].startswith("DeepRetrieval quickstart") and "Estimated time" in said[0]
    names = list(res["evals"])
    assert names[0] == "original (baseline)" and len(names) == 4
    assert res["evals"]["original (baseline)"]["recall"] == pytest.approx(0.286, abs=0.001)  # docs/evaluation.md
    for cell in res["evals"].values():
        assert cell["n"] == 7 and 0.0 <= cell["recall"] <= 1.0
    metrics = rp.read_metrics(out / "logs" / "metrics.jsonl")
    assert [m["step"] for m in metrics if "critic/score/mean" in m] == [1, 2]
    assert any("val/pubmed_mini/recall_mean" in m for m in metrics if m["step"] == 0)
    table = (out / "results.md").read_text()
    assert "+ warm-up + GRPO (2 steps)" in table and "| reward, mean |" in table
    assert (tmp_path / "images" / "reward_curve.png").stat().st_size > 5000
    assert (out / "logs" / "wandb").is_dir()
    # resume: every stage is recorded, a rerun does no work and prints the same table
    said.clear()
    start = time.perf_counter()
    again = qs.run_quickstart(out, tiny=True, steps=2, test_freq=2, progress=False, say=said.append)
    assert time.perf_counter() - start < min(20.0, first_s / 2)
    assert again["table"] == res["table"]
    assert sum(s.startswith("[") and s.endswith("skipped") for s in said) == 6
    # more steps later: training continues from the step-2 checkpoint to step 3, evaluated anew
    said.clear()
    more = qs.run_quickstart(out, tiny=True, steps=3, test_freq=3, progress=False, say=said.append)
    assert any("continuing training" in s for s in said)
    steps = [m["step"] for m in rp.read_metrics(out / "logs" / "metrics.jsonl") if "critic/score/mean" in m]
    assert steps == [1, 2, 3]  # step 1-2 not redone
    assert "+ warm-up + GRPO (3 steps)" in more["table"]
