"""End to end on CPU: the PPO trainer on Ray with 2 FSDP2 workers (tiny Qwen2, pubmed_mini parquet,
local pubmed_mini engine as reward), validation, checkpoints, resume, HF export; the in-process mode;
the `search_unavailable` exclusion."""

import json

import numpy as np
import pytest
import torch

from deepretrieval.trainer.main_ppo import main
from trainer_helpers import (hf_weights, make_assets, overrides, read_metrics, review_question, scripted_rollout,
                             stable, words_query)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, pubmed_mini_index):
    return make_assets(tmp_path_factory.mktemp("trainer_e2e"), pubmed_mini_index)


def test_ray_fsdp2_train_validate_checkpoint_resume_export(assets, tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    common = {"trainer.n_gpus_per_node": 2, "trainer.total_training_steps": 4, "trainer.save_freq": 2,
              "trainer.test_freq": 2, "trainer.max_actor_ckpt_to_keep": 2}
    assert main(overrides(assets, run_a, **common)) == 0
    steps_a, rows_a = read_metrics(run_a)
    assert sorted(steps_a) == [1, 2, 3, 4]
    # validation before training (step 0) and at steps 2 and 4, per data source
    val_steps = [r["step"] for r in rows_a if "val/pubmed_mini/recall_mean" in r]
    assert val_steps == [0, 2, 4]
    for key in ("timing_s/gen", "timing_s/reward", "timing_s/update_actor", "timing_s/update_critic", "perf/throughput",
                "perf/max_memory_rss_gb", "critic/score/mean", "actor/pg_loss", "critic/vf_loss",
                "actor/reward_kl_penalty", "reward/pubmed_mini/recall_mean"):
        assert key in steps_a[4], key
    assert steps_a[4]["actor/reward_kl_penalty_coeff"] == pytest.approx(0.001)

    ckpts = sorted(p.name for p in run_a.iterdir() if p.name.startswith("global_step_"))
    assert ckpts == ["global_step_2", "global_step_4"]
    assert (run_a / "latest_checkpointed_iteration.txt").read_text() == "4"
    hf_dir = run_a / "global_step_4" / "actor" / "huggingface"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (hf_dir / name).is_file(), name
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    # the checkpoint and its export say how the policy was prompted (the parquet's default style)
    from deepretrieval.trainer.checkpoint import read_prompt_settings

    for folder in (run_a / "global_step_4", hf_dir):
        settings = read_prompt_settings(folder)
        assert settings["prompt_style"] == "reasoning" and settings["data_sources"] == ["pubmed_mini"]
        assert settings["max_prompt_length"] == 384 and settings["apply_chat_template"] is True

    # the exported actor loads with transformers and has moved away from the initial weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tok("diabetes insulin", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3 or tok.eos_token_id in out[0].tolist()
    final = hf_weights(hf_dir)
    initial = hf_weights(assets.model)
    assert set(final) == set(initial)
    assert any(not torch.equal(final[k], initial[k]) for k in final)

    # resume after step 2 of 4 in a fresh folder: the same metrics and weights as the straight run
    assert main(overrides(assets, run_b, **common, **{"trainer.resume_mode": str(run_a / "global_step_2"),
                                                     "trainer.val_before_train": False})) == 0
    steps_b, _ = read_metrics(run_b)
    assert sorted(steps_b) == [3, 4]
    for step in (3, 4):
        assert stable(steps_b[step]) == stable(steps_a[step])
    resumed = hf_weights(run_b / "global_step_4" / "actor" / "huggingface")
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_in_process_mode_and_auto_resume(assets, tmp_path):
    out = tmp_path / "local"
    extra = {"trainer.use_ray": False, "trainer.n_gpus_per_node": 1, "trainer.total_training_steps": 2,
             "trainer.val_before_train": False, "actor_rollout_ref.rollout.n": 1,
             "actor_rollout_ref.actor.ppo_mini_batch_size": 4, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 4,
             "critic.ppo_micro_batch_size_per_gpu": 4, "trainer.save_hf_model": False}
    assert main(overrides(assets, out, **extra)) == 0
    steps, rows = read_metrics(out)
    assert sorted(steps) == [1, 2]
    assert "val/pubmed_mini/recall_mean" in steps[2]  # validation after the last step
    assert (out / "global_step_2" / "trainer_state.pt").is_file()
    assert json.loads((out / "global_step_2" / "prompt.json").read_text())["prompt_styles"] == ["reasoning"]
    assert not (out / "global_step_2" / "actor" / "huggingface").exists()
    # resume_mode=auto picks up the latest checkpoint and only runs the missing step
    extra["trainer.total_training_steps"] = 3
    assert main(overrides(assets, out, **extra)) == 0
    steps, _ = read_metrics(out)
    assert sorted(steps) == [1, 2, 3]
    state = torch.load(out / "global_step_3" / "trainer_state.pt", weights_only=False)
    assert state["global_step"] == 3
    # 21 training prompts / batch 4 = 5 batches per epoch: 3 steps = epoch 0, next batch index 3
    assert state["loader"]["epoch"] == 0 and state["loader"]["batch_in_epoch"] == 3


def test_worker_failure_stops_the_run_cleanly(assets, tmp_path):
    import shutil

    import ray

    broken = tmp_path / "broken_model"
    shutil.copytree(assets.model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "run"
    args = overrides(assets, out, **{"trainer.n_gpus_per_node": 2, "actor_rollout_ref.model.path": str(broken),
                                     "data.tokenizer": assets.model, "trainer.total_training_steps": 1})
    assert main(args) == 1  # the workers' load error ends the run (no hang) ...
    assert not ray.is_initialized()  # ... and the Ray instance the trainer started is gone
    assert not any(p.name.startswith("global_step_") for p in out.glob("*"))


def test_search_unavailable_samples_are_left_out_of_the_update():
    from omegaconf import OmegaConf

    from deepretrieval.protocol import Batch
    from deepretrieval.trainer.step import compute_advantage_leaving_out, place_outcome_reward

    cfg = OmegaConf.create({"algorithm": {"adv_estimator": "grpo", "gamma": 1.0, "lam": 1.0,
                                          "norm_adv_by_std_in_grpo": True}})
    mask = torch.ones(6, 3, dtype=torch.long)
    scores = torch.tensor([1.0, 3.0, 5.0, 0.0, 2.0, 4.0])
    batch = Batch.from_dict({"response_mask": mask.clone(),
                             "token_level_rewards": place_outcome_reward(scores, mask)},
                            {"uid": np.array(["a", "a", "a", "b", "b", "b"], dtype=object)})
    unavailable = torch.tensor([False, False, False, True, False, False])
    out = compute_advantage_leaving_out(batch, unavailable, cfg.algorithm)
    adv = out.batch["advantages"][:, 0]
    # group a: scores 1,3,5 -> mean 3, std 2 ; group b without the flagged sample: 2,4 -> mean 3, std sqrt(2)
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, -1 / 2 ** 0.5, 1 / 2 ** 0.5])
    assert torch.allclose(adv, expected, atol=1e-4)
    assert out.batch["response_mask"][3].sum() == 0 and out.batch["response_mask"][[0, 1, 2, 4, 5]].all()


def test_reward_runs_real_local_searches(assets, tmp_path, monkeypatch):
    """A tiny random model never writes a parsable answer, so the other runs score format failures
    only. Here the rollout answers every prompt with a well-formed answer whose query ORs the words
    of the prompt's review question: one step over all 21 training topics must search the local
    index, and its reward metrics must equal recall@100 and the DeepRetrieval tiers computed here
    independently, topic by topic."""
    import pandas as pd

    from deepretrieval.models.tiny import load_tiny_tokenizer
    from deepretrieval.search.local import LocalSearchEngine
    from deepretrieval.workers.rollout import hf

    def answer(question):
        return [f'plan</think>\n<answer>{{"query": "{words_query(question)}"}}</answer>']

    monkeypatch.setattr(hf.HFRollout, "generate_sequences", scripted_rollout(load_tiny_tokenizer(), answer))
    out = tmp_path / "searching"
    extra = {"trainer.use_ray": False, "trainer.n_gpus_per_node": 1, "trainer.total_training_steps": 1,
             "trainer.val_before_train": False, "trainer.save_freq": 0, "trainer.save_hf_model": False,
             "data.train_batch_size": 21, "data.max_response_length": 160, "actor_rollout_ref.rollout.n": 1,
             "actor_rollout_ref.actor.ppo_mini_batch_size": 21,
             "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 7, "critic.ppo_micro_batch_size_per_gpu": 7}
    assert main(overrides(assets, out, **extra)) == 0
    row = read_metrics(out)[0][1]

    engine = LocalSearchEngine(assets.index)
    tiers = [(0.7, 5), (0.5, 4), (0.4, 3), (0.3, 1), (0.1, 0.5), (0.05, 0.1)]
    recalls, scores = [], []
    for prompt, gt in zip(pd.read_parquet(assets.train)["prompt"], pd.read_parquet(assets.train)["reward_model"]):
        question = review_question(prompt[-1]["content"])
        targets = set(gt["ground_truth"]["target"])
        recalls.append(len(set(engine.search(words_query(question), k=100).ids) & targets) / len(targets))
        scores.append(1 + next((s for t, s in tiers if recalls[-1] >= t - 1e-12), -3.5))
    assert len(recalls) == 21 and len(set(scores)) >= 3  # a spread of tiers, not one constant
    assert row["reward/format_error_ratio"] == 0.0 and row["reward/search_error_ratio"] == 0.0
    assert row["reward/pubmed_mini/recall_mean"] == pytest.approx(sum(recalls) / 21, abs=1e-6)
    assert row["critic/score/mean"] == pytest.approx(sum(scores) / 21, abs=1e-5)
