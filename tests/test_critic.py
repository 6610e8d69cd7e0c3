"""Critic: value-head alignment (causal, state before each response token), masking, learning toward
returns, save/load round trip, initialisation from a folder, skip on non-finite gradients."""

import copy

import pytest
import torch

from deepretrieval.models.tiny import make_prompt_batch, make_tiny_qwen2, save_tiny_model
from deepretrieval.workers.critic import VALUE_HEAD_FILE, Critic, ValueModel
from deepretrieval.workers.rollout import HFRollout
from deepretrieval.workers.config import CriticConfig, RolloutConfig, from_dict

# one intra-op thread for tiny models (see conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # ValueModel's head is randomly initialised; the same head in every process


TEXTS = ["diabetes trials", "heart failure", "screening for colorectal cancer", "asthma in children"]


@pytest.fixture(scope="module")
def actor_model(tok):
    return make_tiny_qwen2(tok, hidden_size=64, seed=7)


@pytest.fixture(scope="module")
def batch(tok, actor_model):
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"seed": 0})
    out = HFRollout(actor_model, tok, from_dict(RolloutConfig, {"response_length": 5, "n": 1})).generate_sequences(prompts)
    out.batch["response_mask"][1, 3:] = 0  # as if sample 1 had stopped at its 3rd token
    return out


def _cfg(**kw):
    cfg = {"ppo_mini_batch_size": 4, "ppo_micro_batch_size_per_gpu": 2, "cliprange_value": 100.0, "grad_clip": 1.0,
           "optim": {"lr": 1e-2, "weight_decay": 0.0}}
    cfg.update(kw)
    return cfg


def value_model(actor_model):
    """A value model on a copy of the actor's decoder (a critic initialised from the actor)."""
    return ValueModel(copy.deepcopy(actor_model.get_decoder()))


def test_value_head_initialisation(actor_model):
    vm = value_model(actor_model)
    assert vm.value_head.weight.shape == (1, 64) and torch.all(vm.value_head.bias == 0)
    assert 0 < vm.value_head.weight.std() < 3 / 65  # std 1 / (hidden + 1): values start near 0


def test_values_are_causal_and_masked(batch, actor_model):
    """values[:, t] = head(h at the position before response token t), computed from the prefix alone."""
    vm = value_model(actor_model)
    critic = Critic(vm, from_dict(CriticConfig, _cfg()))
    values = critic.compute_values(batch)
    assert values.shape == (4, 5) and values.dtype == torch.float32
    assert torch.all(values[1, 3:] == 0)
    P = batch.batch["prompts"].shape[1]
    b = batch.batch
    with torch.no_grad():
        for t in range(5):
            end = P + t  # prefix up to (not including) response token t
            h = vm.backbone(input_ids=b["input_ids"][:, :end], attention_mask=b["attention_mask"][:, :end],
                            position_ids=b["position_ids"][:, :end]).last_hidden_state[:, -1]
            expected = vm.value_head(h).squeeze(-1) * b["response_mask"][:, t]
            torch.testing.assert_close(values[:, t], expected, atol=1e-5, rtol=1e-5)


def test_update_critic_fits_returns(batch, actor_model):
    vm = value_model(actor_model)
    critic = Critic(vm, from_dict(CriticConfig, _cfg(ppo_epochs=2)))
    data = batch.clone()
    data.batch["returns"] = torch.linspace(-1, 1, 20).view(4, 5) * data.batch["response_mask"]
    losses = []
    for _ in range(15):
        data.batch["values"] = critic.compute_values(data)
        m = critic.update_critic(data)
        losses.append(m["critic/vf_loss"])
        assert m["critic/optimizer_steps"] == 2.0 and m["critic/skipped_steps"] == 0.0
    assert losses[-1] < 0.2 * losses[0]
    assert set(m) >= {"critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "critic/grad_norm", "critic/lr"}


def test_value_clipping_fraction_and_loss_by_hand(batch, actor_model):
    """Stored values sit 1 below the current predictions V, eps_v = 1e-4, so V^clip = V - 1 + eps_v.
    Rows 0-1 have R = V + 10: (V^clip - R)^2 = (11 - eps_v)^2 > 100, clipped. Rows 2-3 have R = V - 10:
    (9 + eps_v)^2 < 100, not clipped. Row 1 has 3 live tokens, the others 5: clipfrac = 8/18 and
    vf_loss = 0.5 * (8 * (11 - eps_v)^2 + 10 * 100) / 18 (token-mean), measured before the one optimiser step."""
    eps = 1e-4
    vm = value_model(actor_model)  # lr 0: both critics below see the same (randomly initialised) head
    critic = Critic(vm,
                    from_dict(CriticConfig, _cfg(cliprange_value=eps, ppo_micro_batch_size_per_gpu=4, optim={"lr": 0.0})))
    data = batch.clone()
    mask = data.batch["response_mask"].float()
    current = critic.compute_values(data)
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0]).view(4, 1)
    data.batch["values"] = (current - 1.0) * mask
    data.batch["returns"] = (current + 10.0 * sign) * mask
    m = critic.update_critic(data)
    assert m["critic/vf_clipfrac"] == pytest.approx(8 / 18)
    assert m["critic/vf_loss"] == pytest.approx(0.5 * (8 * (11 - eps) ** 2 + 10 * 100) / 18, rel=1e-4)

    # no clipping range: the plain squared error, nothing counted as clipped
    critic = Critic(vm, from_dict(CriticConfig, _cfg(cliprange_value=None, ppo_micro_batch_size_per_gpu=4, optim={"lr": 0.0})))
    m = critic.update_critic(data)
    assert m["critic/vf_clipfrac"] == 0.0 and m["critic/vf_loss"] == pytest.approx(0.5 * 100, rel=1e-4)


def test_non_finite_returns_skip_step(batch, actor_model):
    vm = value_model(actor_model)
    before = [p.detach().clone() for p in vm.parameters()]
    critic = Critic(vm, from_dict(CriticConfig, _cfg(ppo_micro_batch_size_per_gpu=4)))
    data = batch.clone()
    data.batch["values"] = torch.zeros(4, 5)
    data.batch["returns"] = torch.zeros(4, 5)
    data.batch["returns"][0, 0] = float("inf")
    m = critic.update_critic(data)
    assert m["critic/skipped_steps"] == 1.0 and m["critic/optimizer_steps"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, vm.parameters()))


def test_save_and_load_round_trip(tmp_path, batch, actor_model, tok):
    vm = value_model(actor_model)
    torch.nn.init.normal_(vm.value_head.weight, std=0.5)
    vm.save_pretrained(tmp_path / "critic")
    assert (tmp_path / "critic" / VALUE_HEAD_FILE).is_file()
    loaded = ValueModel.from_pretrained(tmp_path / "critic")
    a = Critic(vm, from_dict(CriticConfig, _cfg())).compute_values(batch)
    b = Critic(loaded, from_dict(CriticConfig, _cfg())).compute_values(batch)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # a plain causal-LM folder: the LM head is dropped, the value head is new
    path = save_tiny_model(tmp_path / "lm", tokenizer=tok, hidden_size=64, seed=7)
    fresh = ValueModel.from_pretrained(path, enable_gradient_checkpointing=True)
    for p1, p2 in zip(actor_model.get_decoder().parameters(), fresh.backbone.parameters()):
        assert torch.equal(p1, p2)
    critic = Critic(fresh, from_dict(CriticConfig, _cfg()))
    data = batch.clone()
    data.batch["values"] = critic.compute_values(data)
    data.batch["returns"] = torch.ones(4, 5)
    assert critic.update_critic(data)["critic/grad_norm"] > 0


def test_missing_keys(batch, actor_model):
    with pytest.raises(KeyError, match="returns"):
        Critic(value_model(actor_model), from_dict(CriticConfig, _cfg())).update_critic(batch)
