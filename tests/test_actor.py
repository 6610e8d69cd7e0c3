"""Actor: micro-batched log-probs, PPO update direction, gradient accumulation, skip on non-finite
gradients, LR warm-up, mini-batch/epoch arithmetic, KL/entropy terms, LoRA + reference, checkpointing."""

import numpy as np
import pytest
import torch

from deepretrieval.models.tiny import make_prompt_batch, make_tiny_qwen2, save_tiny_model
from deepretrieval.workers.actor import Actor, load_actor_model
from deepretrieval.workers.logprob import naive_response_log_probs
from deepretrieval.workers.optim import build_lr_scheduler, lr_multiplier
from deepretrieval.workers.reference import Reference, frozen_copy
from deepretrieval.workers.rollout import HFRollout
from deepretrieval.workers.config import ActorConfig, ModelConfig, OptimConfig, RolloutConfig, from_dict

# one intra-op thread for tiny models (see conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["diabetes trials", "heart failure", "screening for colorectal cancer", "asthma in children"]


@pytest.fixture(scope="module")
def rollout_batch(tok):
    """4 prompts x 2 samples of 5 tokens from a fixed model, with per-sample advantages set later."""
    model = make_tiny_qwen2(tok, hidden_size=64, seed=4)
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"seed": 0})
    return HFRollout(model, tok, from_dict(RolloutConfig, {"response_length": 5, "n": 2})).generate_sequences(prompts)


def _train_batch(actor, batch, advantages):
    b = batch.clone()
    b.batch["old_log_probs"], _ = actor.compute_log_prob(b)
    b.batch["advantages"] = advantages
    return b


def _cfg(**kw):
    cfg = {"ppo_mini_batch_size": 8, "ppo_micro_batch_size_per_gpu": 8, "ppo_epochs": 1, "clip_ratio": 0.2,
           "grad_clip": 1.0, "optim": {"lr": 1e-2, "weight_decay": 0.0}}
    optim = kw.pop("optim", {})
    cfg.update(kw)
    cfg["optim"].update(optim)
    return cfg


def test_compute_log_prob_micro_batches_match_naive(tok, rollout_batch):
    model = make_tiny_qwen2(tok, hidden_size=64, seed=5)
    actor = Actor(model, from_dict(ActorConfig, _cfg(log_prob_micro_batch_size_per_gpu=3, logprob_chunk_size=7)))
    lp, ent = actor.compute_log_prob(rollout_batch, calculate_entropy=True)
    b = rollout_batch.batch
    with torch.no_grad():
        ref, ref_ent = naive_response_log_probs(model, b["input_ids"], b["attention_mask"], b["position_ids"], 5,
                                                calculate_entropy=True)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    rollout_batch.meta_info["micro_batch_size"] = 1  # meta_info overrides the config
    try:
        lp1, _ = actor.compute_log_prob(rollout_batch)
    finally:
        del rollout_batch.meta_info["micro_batch_size"]
    torch.testing.assert_close(lp1, lp, atol=1e-6, rtol=0)
    assert actor._optimizer is None  # a log-prob-only actor allocates no optimiser


def test_update_moves_log_probs_with_advantage_sign(tok, rollout_batch):
    model = make_tiny_qwen2(tok, hidden_size=64, seed=5)
    actor = Actor(model, from_dict(ActorConfig, _cfg(optim={"lr": 1e-3})))
    adv = torch.tensor([1.0, -1.0] * 4)[:, None].expand(8, 5).contiguous()
    batch = _train_batch(actor, rollout_batch, adv)
    metrics = actor.update_policy(batch)
    new_lp, _ = actor.compute_log_prob(batch)
    delta = ((new_lp - batch.batch["old_log_probs"]) * batch.batch["response_mask"]).sum(-1)
    assert (delta[0::2] > 0).all() and (delta[1::2] < 0).all()
    # first step: ratio = 1 exactly, so the loss is -mean(A) = 0 and nothing is clipped
    assert metrics["actor/pg_loss"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["actor/pg_clipfrac"] == 0.0 and metrics["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["actor/grad_norm"] > 0 and metrics["actor/optimizer_steps"] == 1.0
    assert metrics["actor/skipped_steps"] == 0.0 and metrics["actor/lr"] == pytest.approx(1e-3)


def test_gradient_accumulation_equals_full_batch(tok, rollout_batch):
    """Micro-batches of 1, 3 and 8 samples give the same update (equal token counts per sample)."""
    params = []
    for micro in (8, 3, 1):
        model = make_tiny_qwen2(tok, hidden_size=64, seed=6)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        actor = Actor(model, from_dict(ActorConfig, _cfg(ppo_micro_batch_size_per_gpu=micro, grad_clip=0)), optimizer=opt)
        batch = _train_batch(actor, rollout_batch, torch.randn(8, 5, generator=torch.Generator().manual_seed(0)))
        batch.batch["response_mask"] = torch.ones_like(batch.batch["response_mask"])
        actor.update_policy(batch)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[1], params[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(params[2], params[0], atol=1e-6, rtol=1e-5)


def test_non_finite_gradient_skips_step(tok, rollout_batch):
    model = make_tiny_qwen2(tok, hidden_size=64, seed=5)
    before = [p.detach().clone() for p in model.parameters()]
    actor = Actor(model, from_dict(ActorConfig, _cfg()))
    adv = torch.ones(8, 5)
    adv[0, 0] = float("nan")
    metrics = actor.update_policy(_train_batch(actor, rollout_batch, adv))
    assert metrics["actor/skipped_steps"] == 1.0 and metrics["actor/optimizer_steps"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_mini_batches_epochs_and_rollout_n(tok, rollout_batch):
    actor = Actor(make_tiny_qwen2(tok, hidden_size=64, seed=5), from_dict(ActorConfig, _cfg(ppo_mini_batch_size=2, ppo_micro_batch_size_per_gpu=2,
                                                                    ppo_epochs=2, shuffle=True)))
    batch = _train_batch(actor, rollout_batch, torch.zeros(8, 5))
    batch.meta_info["rollout_n"] = 2  # 2 prompts x 2 samples = 4 samples per mini-batch
    assert actor.update_policy(batch)["actor/optimizer_steps"] == 4.0  # 2 mini-batches x 2 epochs
    del batch.meta_info["rollout_n"]
    assert actor.update_policy(batch)["actor/optimizer_steps"] == 8.0  # config in samples: 4 x 2


def test_lr_warmup_schedule(tok, rollout_batch):
    actor = Actor(make_tiny_qwen2(tok, hidden_size=64, seed=5), from_dict(ActorConfig, _cfg(optim={"lr": 0.1, "lr_warmup_steps": 4})))
    batch = _train_batch(actor, rollout_batch, torch.zeros(8, 5))
    lrs = [actor.update_policy(batch)["actor/lr"] for _ in range(5)]
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])


def test_lr_schedule_ratio_and_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, from_dict(OptimConfig, {"lr_warmup_steps_ratio": 0.2, "warmup_style": "cosine", "min_lr_ratio": 0.1}), total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:3] == pytest.approx([0.5, 1.0, 1.0])  # 2 warm-up steps, then cosine from the top
    assert seen[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 7 / 8)))
    assert lr_multiplier(100, 2, 10, "cosine", 0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_style"):
        build_lr_scheduler(opt, from_dict(OptimConfig, {"warmup_style": "linearish"}))


def test_kl_loss_and_entropy_terms(tok, rollout_batch):
    model = make_tiny_qwen2(tok, hidden_size=64, seed=5)
    ref = Reference(frozen_copy(model))
    actor = Actor(model, from_dict(ActorConfig, _cfg(use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="low_var_kl", entropy_coeff=0.01)))
    batch = _train_batch(actor, rollout_batch, torch.zeros(8, 5))
    with pytest.raises(KeyError, match="ref_log_prob"):
        actor.update_policy(batch)
    batch.batch["ref_log_prob"] = ref.compute_ref_log_prob(batch)
    torch.testing.assert_close(batch.batch["ref_log_prob"], batch.batch["old_log_probs"], atol=0, rtol=0)
    m1 = actor.update_policy(batch)
    assert m1["actor/kl_loss"] == pytest.approx(0.0, abs=1e-7)  # policy == reference before the first step
    assert 0 < m1["actor/entropy"] <= np.log(len(tok)) + 1e-4 and m1["actor/kl_coef"] == 0.5
    m2 = actor.update_policy(batch)
    assert m2["actor/kl_loss"] > 0  # the entropy bonus moved the policy away from the reference
    # the frozen reference did not move
    torch.testing.assert_close(ref.compute_ref_log_prob(batch), batch.batch["old_log_probs"], atol=0, rtol=0)


def test_entropy_bonus_raises_entropy(tok, rollout_batch):
    model = make_tiny_qwen2(tok, hidden_size=64, seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked (low-entropy) policy, far from the uniform maximum
    actor = Actor(model, from_dict(ActorConfig, _cfg(entropy_coeff=1.0)), optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    batch = _train_batch(actor, rollout_batch, torch.zeros(8, 5))
    _, ent0 = actor.compute_log_prob(batch, calculate_entropy=True)
    for _ in range(3):
        actor.update_policy(batch)
    _, ent1 = actor.compute_log_prob(batch, calculate_entropy=True)
    assert ent0.mean() < 0.8 * np.log(len(tok))
    assert ent1.mean() > ent0.mean() + 1e-3


def test_lora_actor_and_adapter_disabled_reference(tok, rollout_batch, tmp_path):
    path = save_tiny_model(tmp_path / "tiny", tokenizer=tok, hidden_size=64, seed=5)
    base = load_actor_model(from_dict(ModelConfig, {"path": path}))
    model = load_actor_model(from_dict(ModelConfig, {"path": path, "lora_rank": 4, "lora_alpha": 8, "target_modules": "q_proj,v_proj",
                              "enable_gradient_checkpointing": True}))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    actor = Actor(model, from_dict(ActorConfig, _cfg(optim={"lr": 5e-2})))
    ref = Reference(actor)  # shares the model, adapter disabled
    with pytest.raises(ValueError):
        Reference(Actor(base, from_dict(ActorConfig, _cfg())))  # a fully trained actor cannot be its own reference
    batch = _train_batch(actor, rollout_batch, torch.tensor([1.0, -1.0] * 4)[:, None].expand(8, 5).contiguous())
    b = batch.batch
    with torch.no_grad():
        base_lp, _ = naive_response_log_probs(base, b["input_ids"], b["attention_mask"], b["position_ids"], 5)
    torch.testing.assert_close(batch.batch["old_log_probs"], base_lp, atol=1e-5, rtol=0)  # LoRA B starts at 0
    for _ in range(2):
        actor.update_policy(batch)
    new_lp, _ = actor.compute_log_prob(batch)
    assert (new_lp - base_lp).abs().max() > 1e-3  # the adapter learned something
    torch.testing.assert_close(ref.compute_ref_log_prob(batch), base_lp, atol=1e-5, rtol=0)


def test_gradient_checkpointing_same_update(tok, rollout_batch, tmp_path):
    path = save_tiny_model(tmp_path / "tiny", tokenizer=tok, hidden_size=64, seed=5)
    params = []
    for ckpt in (False, True):
        model = load_actor_model(from_dict(ModelConfig, {"path": path, "enable_gradient_checkpointing": ckpt}))
        actor = Actor(model, from_dict(ActorConfig, _cfg(ppo_micro_batch_size_per_gpu=4)), optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
        actor.update_policy(_train_batch(actor, rollout_batch, torch.randn(8, 5, generator=torch.Generator().manual_seed(1))))
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], atol=1e-6, rtol=1e-5)


def test_update_without_old_log_probs_equals_recomputed(tok, rollout_batch):
    """recompute_old_log_prob=false: one optimiser step from the sampling policy gives the same update
    (the ratio is 1 either way, so the gradient is the same); more than one step is refused."""
    params = []
    for recompute in (True, False):
        model = make_tiny_qwen2(tok, hidden_size=64, seed=6)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        actor = Actor(model, from_dict(ActorConfig, _cfg(ppo_micro_batch_size_per_gpu=3, grad_clip=0,
                                                         recompute_old_log_prob=recompute)), optimizer=opt)
        adv = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
        batch = _train_batch(actor, rollout_batch, adv) if recompute else rollout_batch.clone()
        batch.batch["advantages"] = adv
        metrics = actor.update_policy(batch)
        assert metrics["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-6) and metrics["actor/pg_clipfrac"] == 0.0
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(params[0], torch.cat([p.detach().flatten() for p in make_tiny_qwen2(tok, hidden_size=64, seed=6).parameters()]))
    torch.testing.assert_close(params[1], params[0], atol=1e-6, rtol=1e-5)
    for kw in ({"ppo_epochs": 2}, {"ppo_mini_batch_size": 4}):
        actor = Actor(make_tiny_qwen2(tok, hidden_size=64, seed=6),
                      from_dict(ActorConfig, _cfg(recompute_old_log_prob=False, **kw)))
        batch = rollout_batch.clone()
        batch.batch["advantages"] = torch.ones(8, 5)
        with pytest.raises(ValueError, match="one optimiser step per batch"):
            actor.update_policy(batch)
