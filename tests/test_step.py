"""One PPO step (`trainer.step`): outcome reward placement, KL-in-reward, advantage dispatch, the step's
calls and metrics against scripted workers; the metrics and timer of `trainer.metrics`."""

from __future__ import annotations

import math
import time

import pytest
import torch

from deepretrieval.algorithms import core_algos as ca
from deepretrieval.protocol import Batch
from deepretrieval.trainer import metrics as tm
from deepretrieval.trainer import step as pc


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
    m = tm.compute_data_metrics(b, use_critic=True)
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
    no_critic = tm.compute_data_metrics(b, use_critic=False)
    assert "critic/values/mean" not in no_critic and "critic/advantages/mean" in no_critic
    # a validation-style batch without advantages still yields what it can
    partial = tm.compute_data_metrics(b.select(batch_keys=["responses", "attention_mask", "token_level_scores"]))
    assert partial["critic/score/mean"] == pytest.approx(0.5) and "critic/advantages/mean" not in partial


def test_timing_and_throughput_metrics():
    b = rollout_batch()
    timings = {"gen": 1.2, "update_actor": 0.38, "reward": 0.5, "step": 2.0}
    m = tm.compute_timing_metrics(b, timings)
    n_resp, n_prompt = 12, 7
    assert m["timing_s/gen"] == 1.2 and m["timing_s/reward"] == 0.5
    assert m["timing_per_token_ms/gen"] == pytest.approx(1200 / n_resp)
    assert m["timing_per_token_ms/update_actor"] == pytest.approx(380 / (n_resp + n_prompt))
    assert "timing_per_token_ms/reward" not in m
    t = tm.compute_throughput_metrics(b, timings, n_gpus=2)
    assert t == {"perf/total_num_tokens": 19.0, "perf/time_per_step": 2.0, "perf/throughput": 19.0 / 4}
    b.meta_info["global_token_num"] = [5, 5, 10]
    assert tm.compute_throughput_metrics(b, timings)["perf/total_num_tokens"] == 20.0


def test_marked_timer_accumulates_and_survives_errors():
    timings: dict[str, float] = {}
    with tm.marked_timer("gen", timings):
        time.sleep(0.01)
    first = timings["gen"]
    assert first >= 0.009
    with pytest.raises(RuntimeError):
        with tm.marked_timer("gen", timings):
            raise RuntimeError("boom")
    assert timings["gen"] >= first



# -- ppo_step against scripted workers ---------------------------------------------------------------

RESP = 2  # response tokens per sample


class ScriptedActor:
    """The actor worker group's methods, recording each call (name, the tensor keys it received)."""

    def __init__(self, calls):
        self.calls = calls

    def generate_sequences(self, prompts: Batch) -> Batch:
        self.calls.append(("gen", dict(prompts.meta_info), list(prompts.non_tensor_batch["uid"])))
        out = prompts.repeat(2, interleave=True)  # n = 2
        bsz = len(out)
        responses = torch.arange(bsz * RESP).view(bsz, RESP) + 10
        resp_mask = torch.ones(bsz, RESP, dtype=torch.long)
        resp_mask[1, 1] = 0  # sample 1 stopped after one token
        positions = out.batch["position_ids"][:, -1:] + torch.arange(1, RESP + 1)
        batch = Batch.from_dict(
            {"prompts": out.batch["input_ids"], "responses": responses,
             "input_ids": torch.cat([out.batch["input_ids"], responses], -1),
             "attention_mask": torch.cat([out.batch["attention_mask"], resp_mask], -1),
             "position_ids": torch.cat([out.batch["position_ids"], positions], -1), "response_mask": resp_mask},
            dict(out.non_tensor_batch), {"temperature": 0.7, "timing_gen_worker_s": 9.0})
        return batch

    def compute_log_prob(self, batch: Batch) -> Batch:
        self.calls.append(("old_log_prob", sorted(batch.tensor_keys), dict(batch.meta_info)))
        return Batch.from_dict({"old_log_probs": torch.full((len(batch), RESP), -1.0),
                                "entropys": torch.full((len(batch), RESP), 0.25)})

    def compute_ref_log_prob(self, batch: Batch) -> Batch:
        self.calls.append(("ref", sorted(batch.tensor_keys), dict(batch.meta_info)))
        return Batch.from_dict({"ref_log_prob": torch.full((len(batch), RESP), -1.5)})

    def update_actor(self, batch: Batch) -> dict:
        self.calls.append(("update_actor", sorted(batch.tensor_keys), batch))
        return {"actor/pg_loss": 0.5}


class ScriptedCritic:
    def __init__(self, calls):
        self.calls = calls

    def compute_values(self, batch: Batch) -> Batch:
        self.calls.append(("values", sorted(batch.tensor_keys), dict(batch.meta_info)))
        return Batch.from_dict({"values": torch.zeros(len(batch), RESP)})

    def update_critic(self, batch: Batch) -> dict:
        self.calls.append(("update_critic", sorted(batch.tensor_keys), batch))
        return {"critic/vf_loss": 1.0}


def scripted_reward(scores, unavailable):
    def reward_fn(batch, return_dict=False):
        assert return_dict
        return {"reward_tensor": pc.place_outcome_reward(torch.tensor(scores), batch.batch["response_mask"]),
                "metrics": {"reward/recall_mean": 0.25},
                "reward_extra_info": {"search_unavailable": list(unavailable)}}
    return reward_fn


def step_cfg(**algorithm):
    from omegaconf import OmegaConf

    alg = {"adv_estimator": "grpo", "gamma": 1.0, "lam": 1.0, "norm_adv_by_std_in_grpo": True,
           "use_kl_in_reward": False, "kl_penalty": "kl"}
    alg.update(algorithm)
    return OmegaConf.create({
        "algorithm": alg,
        "actor_rollout_ref": {"actor": {"use_kl_loss": True, "recompute_old_log_prob": True}, "rollout": {"n": 2}},
        "trainer": {"seed": 3, "balance_batch": False, "critic_warmup": 0, "n_gpus_per_node": 1, "nnodes": 1}})


def prompt_batch() -> Batch:
    return Batch.from_dict({"input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]),
                            "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
                            "position_ids": torch.tensor([[0, 0, 1], [0, 1, 2]])})


def test_ppo_step_grpo_calls_uids_and_left_out_sample():
    calls = []
    prompts = prompt_batch()
    metrics = pc.ppo_step(prompts, 5, ScriptedActor(calls), None,
                          scripted_reward([1.0, 0.0, 2.0, 4.0], [False, False, False, True]), step_cfg(), None)
    assert [c[0] for c in calls] == ["gen", "old_log_prob", "ref", "update_actor"]
    gen_meta, uids = calls[0][1], calls[0][2]
    assert uids == ["s5_0", "s5_1"] and gen_meta["seed"] == 3 * 1_000_003 + 5 and gen_meta["validate"] is False
    # only the keys each call needs travel; the sampling temperature goes with the log-prob calls
    assert calls[1][1] == sorted(pc.LOG_PROB_KEYS) and calls[1][2] == {"temperature": 0.7}
    assert calls[2][1] == sorted(pc.LOG_PROB_KEYS)
    update = calls[3][2]
    assert calls[3][1] == sorted(pc.ACTOR_UPDATE_KEYS + ["ref_log_prob"])
    # group s5_0: scores 1, 0 -> mean 0.5, std sqrt(0.5); group s5_1 without the unavailable sample:
    # the singleton {2} -> mean 0, std 1 (core_algos) -> advantage 2; the left-out sample: 0, no mask
    s = 0.5 / (0.5 ** 0.5 + 1e-6)
    expected = torch.tensor([[s, s], [-s, 0.0], [2.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(update.batch["advantages"], expected)
    assert update.batch["response_mask"].tolist() == [[1, 1], [1, 0], [1, 1], [0, 0]]
    assert metrics["train/search_unavailable_samples"] == 1.0 and metrics["train/step_skipped"] == 0.0
    assert metrics["reward/recall_mean"] == 0.25 and metrics["actor/pg_loss"] == 0.5
    assert metrics["critic/score/mean"] == pytest.approx((1 + 0 + 2 + 4) / 4)
    assert metrics["actor/entropy_rollout"] == pytest.approx(0.25)
    assert metrics["train/rollout_n"] == 2.0 and metrics["perf/total_num_tokens"] == (2 + 2) + (2 + 1) + 2 * (3 + 2)  # prompt + response tokens
    # timings once, under timing_s/ (the step and each phase that ran)
    timed = {k for k in metrics if k.startswith("timing")}
    assert {k for k in timed if k.startswith("timing_s/")} == {
        "timing_s/" + p for p in ("step", "gen", "reward", "old_log_prob", "ref", "adv", "update_actor")}
    assert not any(k.startswith("timing/") for k in metrics)


def test_ppo_step_gae_kl_in_reward_critic_warmup_and_skipped_step():
    from deepretrieval.algorithms.core_algos import FixedKLController

    calls = []
    cfg = step_cfg(adv_estimator="gae", use_kl_in_reward=True)
    cfg.trainer.critic_warmup = 1
    metrics = pc.ppo_step(prompt_batch(), 0, ScriptedActor(calls), ScriptedCritic(calls),
                          scripted_reward([1.0, 0.0, 2.0, 4.0], [False] * 4), cfg, FixedKLController(0.5))
    # step 0 < critic_warmup: the critic learns, the actor waits
    assert [c[0] for c in calls] == ["gen", "old_log_prob", "ref", "values", "update_critic"]
    assert calls[4][1] == sorted(pc.CRITIC_UPDATE_KEYS)
    # KL per token = old - ref = 0.5 on valid tokens; reward = score - 0.5 * 0.5 per valid token
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(0.5)
    assert metrics["critic/rewards/mean"] == pytest.approx((1 + 0 + 2 + 4) / 4 - 0.25 * 7 / 4)
    assert metrics["critic/vf_loss"] == 1.0 and "actor/pg_loss" not in metrics

    calls.clear()
    metrics = pc.ppo_step(prompt_batch(), 1, ScriptedActor(calls), ScriptedCritic(calls),
                          scripted_reward([1.0, 0.0, 2.0, 4.0], [True] * 4), cfg, FixedKLController(0.5))
    assert [c[0] for c in calls] == ["gen", "old_log_prob", "ref", "values"]  # no update at all
    assert metrics["train/step_skipped"] == 1.0 and metrics["train/search_unavailable_samples"] == 4.0



def test_ppo_step_with_a_rollout_that_sets_no_temperature():
    """A rollout that does not report its temperature: the log-prob calls get 1.0 (unscaled)."""

    class PlainActor(ScriptedActor):
        def generate_sequences(self, prompts: Batch) -> Batch:
            out = super().generate_sequences(prompts)
            out.meta_info.pop("temperature")
            return out

    calls = []
    pc.ppo_step(prompt_batch(), 0, PlainActor(calls), None, scripted_reward([1.0, 0.0, 2.0, 4.0], [False] * 4),
                step_cfg(), None)
    assert [c[0] for c in calls] == ["gen", "old_log_prob", "ref", "update_actor"]
    assert calls[1][2] == {"temperature": 1.0} and calls[2][2] == {"temperature": 1.0}
    assert calls[3][2].meta_info == {"temperature": 1.0}
