"""Driver-side Batch steps: outcome reward placement, KL-in-reward, advantage dispatch, metrics."""

from __future__ import annotations

import math
import time

import pytest
import torch

from deepretrieval.algorithms import core_algos as ca
from deepretrieval.protocol import Batch
from deepretrieval.trainer import ppo_core as pc


def rollout_batch(scores=(1.0, 0.0, 0.5, 0.5), uids=("a", "a", "b", "b")) -> Batch:
    """Prompt width 3 (left padded), response width 4 (right padded)."""
    attention = torch.tensor([
        [0, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
    ])
    response_mask = attention[:, 3:]
    bsz, resp = response_mask.shape
    gen = torch.Generator().manual_seed(0)
    return Batch.from_dict(
        {
            "responses": torch.ones(bsz, resp, dtype=torch.long),
            "attention_mask": attention,
            "response_mask": response_mask,
            "token_level_scores": pc.place_outcome_reward(torch.tensor(scores), response_mask),
            "old_log_probs": -torch.rand(bsz, resp, generator=gen),
            "ref_log_prob": -torch.rand(bsz, resp, generator=gen),
            "values": torch.randn(bsz, resp, generator=gen),
        },
        {"uid": list(uids)},
    )


def test_place_outcome_reward_on_last_valid_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    out = pc.place_outcome_reward(torch.tensor([1.0, 2.0, 3.0, 4.0]), mask)
    expected = torch.tensor([[0, 1.0, 0, 0], [0, 0, 0, 2.0], [0, 0, 3.0, 0], [4.0, 0, 0, 0]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(-1), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert pc.place_outcome_reward([1, 0], torch.ones(2, 3)).dtype == torch.float32
    with pytest.raises(ValueError):
        pc.place_outcome_reward(torch.ones(3), mask)


def test_apply_kl_penalty_hand_computed():
    b = rollout_batch()
    ctrl = ca.FixedKLController(0.5)
    b, metrics = pc.apply_kl_penalty(b, ctrl, kl_penalty="kl")
    mask = b.batch["response_mask"].float()
    kld = (b.batch["old_log_probs"] - b.batch["ref_log_prob"]) * mask
    torch.testing.assert_close(b.batch["token_level_rewards"], b.batch["token_level_scores"] - 0.5 * kld)
    per_seq = [kld[i].sum().item() / mask[i].sum().item() for i in range(4)]
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(sum(per_seq) / 4, rel=1e-6)
    assert metrics["actor/reward_kl_penalty_coeff"] == 0.5


def test_apply_kl_penalty_updates_adaptive_controller():
    b = rollout_batch()
    ctrl = ca.AdaptiveKLController(0.1, target_kl=1e-6, horizon=10)
    _, metrics = pc.apply_kl_penalty(b, ctrl, kl_penalty="abs")
    assert metrics["actor/reward_kl_penalty_coeff"] == 0.1  # beta used before the update
    assert ctrl.value == pytest.approx(0.1 * (1 + 0.2 * 4 / 10))


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_compute_advantage_dispatches_to_estimator(estimator):
    b = rollout_batch()
    b.batch["token_level_rewards"] = b.batch["token_level_scores"] * 2
    pc.compute_advantage(b, estimator, gamma=0.9, lam=0.8, norm_adv_by_std_in_grpo=False)
    rewards, mask = b.batch["token_level_rewards"], b.batch["response_mask"]
    uid = b.non_tensor_batch["uid"]
    direct = {
        "gae": lambda: ca.compute_gae_advantage_return(rewards, b.batch["values"], mask, 0.9, 0.8),
        "grpo": lambda: ca.compute_grpo_outcome_advantage(rewards, mask, uid, norm_adv_by_std_in_grpo=False),
        "rloo": lambda: ca.compute_rloo_outcome_advantage(rewards, mask, uid),
        "reinforce_plus_plus": lambda: ca.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, 0.9),
        "reinforce_plus_plus_baseline": lambda: ca.compute_reinforce_plus_plus_baseline_outcome_advantage(
            rewards, mask, uid),
    }[estimator]()
    torch.testing.assert_close(b.batch["advantages"], direct[0])
    torch.testing.assert_close(b.batch["returns"], direct[1])


def test_compute_advantage_grpo_values_and_fallbacks():
    b = rollout_batch(scores=(1.0, 3.0, 2.0, 2.0))
    b.pop(batch_keys=["response_mask"])  # rebuilt from attention_mask
    pc.compute_advantage(b, "grpo")       # no token_level_rewards: uses the scores
    s = 1 / (math.sqrt(2) + 1e-6)
    adv = b.batch["advantages"]
    assert adv[0, 0].item() == pytest.approx(-s, rel=1e-5) and adv[1, 3].item() == pytest.approx(s, rel=1e-5)
    assert torch.count_nonzero(adv[2:]) == 0
    assert adv[0, 3].item() == 0.0  # padding stays zero
    assert torch.equal(b.batch["response_mask"], b.batch["attention_mask"][:, 3:])

    no_uid = rollout_batch()
    no_uid.pop(non_tensor_batch_keys=["uid"])
    with pytest.raises(KeyError, match="uid"):
        pc.compute_advantage(no_uid, "grpo")
    no_values = rollout_batch()
    no_values.pop(batch_keys=["values"])
    with pytest.raises(KeyError, match="values"):
        pc.compute_advantage(no_values, "gae")
    with pytest.raises(ValueError):
        pc.compute_advantage(rollout_batch(), "ppo2")


def test_compute_data_metrics_hand_computed():
    b = rollout_batch(scores=(1.0, 0.0, 0.5, 0.5))
    b.batch["token_level_rewards"] = b.batch["token_level_scores"]
    pc.compute_advantage(b, "grpo")
    b.batch["returns"] = b.batch["values"] + 0.5 * b.batch["response_mask"]
    m = pc.compute_data_metrics(b, use_critic=True)
    assert m["critic/score/mean"] == pytest.approx(0.5)
    assert m["critic/score/max"] == 1.0 and m["critic/score/min"] == 0.0
    assert m["response_length/mean"] == pytest.approx((3 + 4 + 1 + 4) / 4)
    assert m["response_length/clip_ratio"] == pytest.approx(0.5)
    assert m["prompt_length/mean"] == pytest.approx((2 + 3 + 1 + 1) / 4)
    assert m["prompt_length/clip_ratio"] == pytest.approx(0.25)
    valid = b.batch["response_mask"].bool()
    assert m["critic/values/mean"] == pytest.approx(b.batch["values"][valid].mean().item(), rel=1e-6)
    # returns - values is a constant 0.5 on valid tokens -> explained variance ~1
    ret_var = b.batch["returns"][valid].var().item()
    assert m["critic/vf_explained_var"] == pytest.approx(1 - 0.0 / (ret_var + 1e-5), abs=1e-5)
    no_critic = pc.compute_data_metrics(b, use_critic=False)
    assert "critic/values/mean" not in no_critic and "critic/advantages/mean" in no_critic
    # a validation-style batch without advantages still yields what it can
    partial = pc.compute_data_metrics(b.select(batch_keys=["responses", "attention_mask", "token_level_scores"]))
    assert partial["critic/score/mean"] == pytest.approx(0.5) and "critic/advantages/mean" not in partial


def test_timing_and_throughput_metrics():
    b = rollout_batch()
    timings = {"gen": 1.2, "update_actor": 0.38, "reward": 0.5, "step": 2.0}
    m = pc.compute_timing_metrics(b, timings)
    n_resp, n_prompt = 12, 7
    assert m["timing_s/gen"] == 1.2 and m["timing_s/reward"] == 0.5
    assert m["timing_per_token_ms/gen"] == pytest.approx(1200 / n_resp)
    assert m["timing_per_token_ms/update_actor"] == pytest.approx(380 / (n_resp + n_prompt))
    assert "timing_per_token_ms/reward" not in m
    t = pc.compute_throughput_metrics(b, timings, n_gpus=2)
    assert t == {"perf/total_num_tokens": 19.0, "perf/time_per_step": 2.0, "perf/throughput": 19.0 / 4}
    b.meta_info["global_token_num"] = [5, 5, 10]
    assert pc.compute_throughput_metrics(b, timings)["perf/total_num_tokens"] == 20.0


def test_marked_timer_accumulates_and_survives_errors():
    timings: dict[str, float] = {}
    with pc.marked_timer("gen", timings):
        time.sleep(0.01)
    first = timings["gen"]
    assert first >= 0.009
    with pytest.raises(RuntimeError):
        with pc.marked_timer("gen", timings):
            raise RuntimeError("boom")
    assert timings["gen"] >= first


def test_reduce_metrics():
    assert pc.reduce_metrics({"a": [1.0, 3.0], "b": 2.0}) == {"a": 2.0, "b": 2.0}
    assert pc.reduce_metrics([{"a": 1.0}, {"a": 2.0, "b": 4.0}]) == {"a": 1.5, "b": 4.0}
