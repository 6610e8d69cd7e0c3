"""The production PPO step (`trainer.step.ppo_step`, the one the Ray trainer runs) learns on CPU,
driven over in-process workers (`trainer.single_process`; tiny random Qwen2, automatic reward).

Task: "write capitalised words". Reward = fraction of the response's tokens whose first visible
character is an upper-case letter. The class holds ~7% of the tiny vocabulary, so a random policy
scores ~0.07; the loop must push the mean score of the batch above 0.7. Both runs take a few seconds
on 2 cores (GRPO with a KL loss to a frozen reference; GAE with a critic and a KL penalty in the
reward), so they are ordinary (not slow) tests.
"""

import copy
import dataclasses
import time

import pytest
import torch

from deepretrieval.algorithms.core_algos import FixedKLController
from deepretrieval.models.tiny import load_tiny_tokenizer, make_prompt_batch, make_tiny_qwen2
from deepretrieval.trainer.single_process import run_ppo_steps
from deepretrieval.workers.actor import Actor
from deepretrieval.workers.critic import Critic, ValueModel
from deepretrieval.workers.reference import Reference, frozen_copy
from deepretrieval.workers.rollout import HFRollout
from deepretrieval.workers.config import ActorConfig, CriticConfig, RefConfig, RolloutConfig, from_dict

PROMPTS = ["Write capitalised words.", "Name some places.", "List drugs for diabetes.", "Say something.",
           "Find trials on asthma.", "Titles, please.", "Which hospitals?", "Go on."]
STEPS = 40
THRESHOLD = 0.7


def _capitalised_token_mask(tok):
    return torch.tensor([tok.decode([i]).strip()[:1].isupper() for i in range(len(tok))])


# one intra-op thread for tiny models (see conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")


def _setup(estimator):
    torch.manual_seed(0)
    tok = load_tiny_tokenizer()
    model = make_tiny_qwen2(tok, hidden_size=64, num_layers=2, seed=0)
    target = _capitalised_token_mask(tok)

    def reward(batch):
        resp, mask = batch.batch["responses"], batch.batch["response_mask"].float()
        return (target[resp].float() * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    prompts = make_prompt_batch(tok, PROMPTS)
    rollout = HFRollout(model, tok, from_dict(RolloutConfig, {"response_length": 8, "n": 4, "temperature": 1.0, "do_sample": True}))
    # ppo_mini_batch_size counts prompts; rollout_n turns it into samples (8 x 4 = one step per update)
    actor_cfg = {"ppo_mini_batch_size": 8, "rollout_n": 4, "ppo_micro_batch_size_per_gpu": 16, "ppo_epochs": 1, "clip_ratio": 0.2,
                 "grad_clip": 1.0, "optim": {"lr": 1e-2, "weight_decay": 0.0, "lr_warmup_steps": 3}}
    reference = Reference(frozen_copy(model), from_dict(RefConfig, {"log_prob_micro_batch_size_per_gpu": 16}))
    critic = None
    if estimator == "grpo":
        actor_cfg.update(use_kl_loss=True, kl_loss_coef=0.001, kl_loss_type="low_var_kl")
    else:
        torch.manual_seed(0)  # the value head's random initialisation, the same in every process
        critic = Critic(ValueModel(copy.deepcopy(model.get_decoder())), from_dict(CriticConfig, {"ppo_mini_batch_size": 8, "rollout_n": 4, "ppo_micro_batch_size_per_gpu": 16,
                                                       "cliprange_value": 0.5, "optim": {"lr": 1e-2, "weight_decay": 0.0}}))
    return Actor(model, from_dict(ActorConfig, actor_cfg)), rollout, prompts, reward, critic, reference


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_ppo_loop_learns(estimator):
    actor, rollout, prompts, reward, critic, reference = _setup(estimator)
    kl_ctrl = FixedKLController(kl_coef=0.001) if estimator == "gae" else None
    start = time.perf_counter()
    history = run_ppo_steps(actor, rollout, prompts, reward, num_steps=STEPS, adv_estimator=estimator, critic=critic,
                            reference=reference, kl_ctrl=kl_ctrl, gamma=1.0, lam=1.0)
    elapsed = time.perf_counter() - start
    scores = [h["critic/score/mean"] for h in history]
    curve = " ".join(f"{s:.2f}" for s in scores)
    first, last = sum(scores[:3]) / 3, sum(scores[-5:]) / 5
    print(f"{estimator}: {elapsed:.1f}s, score curve: {curve}")
    assert first < 0.2, curve
    assert last >= THRESHOLD, curve
    assert history[-1]["actor/entropy_rollout"] < history[0]["actor/entropy_rollout"]
    if estimator == "gae":
        assert "critic/vf_loss" in history[-1] and "actor/reward_kl_penalty" in history[-1]
    else:
        assert "actor/kl_loss" in history[-1]


def test_loop_argument_checks():
    actor, rollout, prompts, reward, critic, reference = _setup("grpo")
    with pytest.raises(ValueError, match="critic"):
        run_ppo_steps(actor, rollout, prompts, reward, num_steps=1, adv_estimator="gae")
    with pytest.raises(ValueError, match="reference"):
        run_ppo_steps(actor, rollout, prompts, reward, num_steps=1, adv_estimator="grpo", kl_ctrl=FixedKLController(0.1))


def test_loop_accepts_iterables_dict_rewards_and_stops_early():
    """Prompts as a list of Batches (cycled), a RewardManager-style dict reward (its search_unavailable
    flags reach the step), on_step early stop."""
    actor, rollout, prompts, _, _, _ = _setup("grpo")
    actor.config = dataclasses.replace(actor.config, use_kl_loss=False)
    halves = [prompts[:4], prompts[4:]]
    seen_lengths = []

    def reward(batch):
        seen_lengths.append(len(batch))
        tensor = torch.zeros_like(batch.batch["responses"], dtype=torch.float32)
        tensor[:, 0] = 1.0
        return {"reward_tensor": tensor, "reward_extra_info": {"search_unavailable": [i == 0 for i in range(len(batch))]}}

    history = run_ppo_steps(actor, rollout, halves, reward, num_steps=10, adv_estimator="grpo",
                            on_step=lambda step, metrics: step == 2)
    assert len(history) == 3 and seen_lengths == [16, 16, 16]  # 4 prompts x n=4, stopped after step 2
    assert all(h["critic/score/mean"] == 1.0 for h in history)
    assert all(h["critic/advantages/max"] == 0.0 for h in history)  # equal scores in a group: no signal
    assert all(h["train/search_unavailable_samples"] == 1.0 for h in history)  # left out, as in production
