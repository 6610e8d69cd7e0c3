"""Core RL algorithms against hand-computed values and independent float64 Python-loop references.

The references below are written differently from the implementation on purpose: GAE and
REINFORCE++ compact each row to its valid tokens and run the textbook recursion there (instead of
carrying state across masked positions); group statistics use the ``statistics`` module.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from deepretrieval.algorithms import core_algos as ca
from deepretrieval.algorithms.utils import masked_mean, masked_var, masked_whiten


# ------------------------------------------------------------------------------- references
def ref_whiten(values: list[list[float]], mask: list[list[int]]) -> list[list[float]]:
    flat = [v for row, mrow in zip(values, mask) for v, m in zip(row, mrow) if m]
    mu = sum(flat) / len(flat)
    var = sum((v - mu) ** 2 for v in flat) / (len(flat) - 1) if len(flat) > 1 else 0.0
    return [[(v - mu) / math.sqrt(var + 1e-8) if m else 0.0 for v, m in zip(row, mrow)]
            for row, mrow in zip(values, mask)]


def ref_gae(rewards, values, mask, gamma, lam):
    adv_raw, rets = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask):
        idx = [t for t, m in enumerate(m_row) if m]
        a_row = [0.0] * len(r_row)
        ret_row = [0.0] * len(r_row)
        gae = 0.0
        for k in range(len(idx) - 1, -1, -1):
            t = idx[k]
            v_next = v_row[idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = r_row[t] + gamma * v_next - v_row[t]
            gae = delta + gamma * lam * gae
            a_row[t] = gae
            ret_row[t] = gae + v_row[t]
        adv_raw.append(a_row)
        rets.append(ret_row)
    return ref_whiten(adv_raw, mask), rets


def ref_group_norm(scores, index, norm_by_std, eps):
    groups: dict = {}
    for s, i in zip(scores, index):
        groups.setdefault(i, []).append(s)
    out = []
    for s, i in zip(scores, index):
        g = groups[i]
        if len(g) == 1:
            mu, sd = 0.0, 1.0
        else:
            mu, sd = statistics.mean(g), statistics.stdev(g)
        out.append((s - mu) / (sd + eps) if norm_by_std else s - mu)
    return out


def ref_rloo(scores, index):
    out = []
    for k, (s, i) in enumerate(zip(scores, index)):
        others = [scores[j] for j in range(len(scores)) if index[j] == i and j != k]
        out.append(s - sum(others) / len(others) if others else s)
    return out


def ref_reinforce_pp(rewards, mask, gamma):
    rets = []
    for r_row, m_row in zip(rewards, mask):
        idx = [t for t, m in enumerate(m_row) if m]
        row = [0.0] * len(r_row)
        g = 0.0
        for t in reversed(idx):
            g = r_row[t] + gamma * g
            row[t] = g
        rets.append(row)
    return ref_whiten(rets, mask), rets


def ref_policy_loss_terms(old, new, adv, eps_low, eps_high, c):
    """Per-token loss, clipped flag, dual-clip flag from the PPO/dual-clip definitions."""
    ratio = math.exp(max(-20.0, min(20.0, new - old)))
    unclipped = -adv * ratio
    clipped = -adv * min(max(ratio, 1 - eps_low), 1 + eps_high)
    loss = max(unclipped, clipped)
    lower = False
    if adv < 0 and loss > -adv * c:
        loss = -adv * c
        lower = True
    return loss, clipped > unclipped, lower


def ref_agg(loss, mask, mode):
    if mode == "token-mean":
        vals = [l for row, mrow in zip(loss, mask) for l, m in zip(row, mrow) if m]
        return sum(vals) / len(vals)
    seqs = []
    for row, mrow in zip(loss, mask):
        vals = [l for l, m in zip(row, mrow) if m]
        if not vals:
            continue
        if mode == "seq-mean-token-sum":
            seqs.append(sum(vals))
        elif mode == "seq-mean-token-mean":
            seqs.append(sum(vals) / len(vals))
        else:
            seqs.append(sum(vals) / len(row))
    return sum(seqs) / len(seqs)


def random_mask(gen: torch.Generator, bsz: int, resp: int, holes: bool = True) -> torch.Tensor:
    """Right-padded masks with random lengths >= 1, optionally with masked holes inside."""
    lengths = torch.randint(1, resp + 1, (bsz,), generator=gen)
    mask = (torch.arange(resp)[None, :] < lengths[:, None]).to(torch.float64)
    if holes:
        hole = torch.rand(bsz, resp, generator=gen) < 0.2
        hole[:, 0] = False  # keep at least one valid token per row
        mask = mask * (~hole)
    return mask


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(1234)
    return g


# ------------------------------------------------------------------------------- masked utils
def test_masked_mean_var_whiten_match_numpy(gen):
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    m = random_mask(gen, 5, 7)
    sel = x[m.bool()].numpy()
    assert masked_mean(x, m).item() == pytest.approx(sel.mean(), rel=1e-12)
    assert masked_var(x, m).item() == pytest.approx(sel.var(ddof=1), rel=1e-12)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(sel.var(ddof=0), rel=1e-12)
    w = masked_whiten(x, m)
    assert w[m.bool()].mean().item() == pytest.approx(0.0, abs=1e-12)
    assert w[m.bool()].var().item() == pytest.approx(1.0, rel=1e-6)
    w2 = masked_whiten(x, m, shift_mean=False)
    torch.testing.assert_close(w2 - w, torch.full_like(w, sel.mean()))
    row_mean = masked_mean(x, m, dim=-1)
    for i in range(5):
        assert row_mean[i].item() == pytest.approx(x[i][m[i].bool()].mean().item(), rel=1e-12)


def test_masked_ops_ignore_nan_padding_and_empty_masks():
    x = torch.tensor([[1.0, 3.0, float("nan")]])
    m = torch.tensor([[1, 1, 0]])
    assert masked_mean(x, m).item() == 2.0
    assert masked_var(x, m).item() == 2.0
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
    assert masked_var(torch.tensor([5.0]), torch.tensor([1])).item() == 0.0  # single element: no nan


# ------------------------------------------------------------------------------- GAE
def test_gae_gamma_lambda_one_returns_are_future_reward_sums():
    rewards = torch.tensor([[0.5, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    adv, ret = ca.compute_gae_advantage_return(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[2.5, 2.0, 2.0]], dtype=torch.float64))
    raw = ret - values  # [2.4, 1.8, 1.7] before whitening
    torch.testing.assert_close(adv, (raw - raw.mean()) / torch.sqrt(raw.var() + 1e-8))


def test_gae_hand_example_with_discount():
    # gamma=0.5, lam=0.5, values 1,2 ; reward 4 at the last token
    # delta_1 = 4 + 0 - 2 = 2 ; A_1 = 2 ; delta_0 = 0 + 0.5*2 - 1 = 0 ; A_0 = 0 + 0.25*2 = 0.5
    rewards = torch.tensor([[0.0, 4.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 2.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    adv, ret = ca.compute_gae_advantage_return(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(ret, torch.tensor([[1.5, 4.0, 0.0]], dtype=torch.float64))
    # whitening [0.5, 2]: mean 1.25, unbiased var 1.125
    z = 0.75 / math.sqrt(1.125 + 1e-8)
    torch.testing.assert_close(adv, torch.tensor([[-z, z, 0.0]], dtype=torch.float64))


def test_gae_masked_positions_are_skipped():
    # a masked "tool" token in the middle must not break the bootstrap chain: with the hole
    # removed the result equals the 2-token response [r0, r2] with values [v0, v2].
    rewards = torch.tensor([[0.0, 7.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.3, 5.0, 0.6]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    _, ret = ca.compute_gae_advantage_return(rewards, values, mask, gamma=0.9, lam=0.8)
    compact_r = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    compact_v = torch.tensor([[0.3, 0.6]], dtype=torch.float64)
    _, ret_c = ca.compute_gae_advantage_return(compact_r, compact_v, torch.ones(1, 2, dtype=torch.float64), 0.9, 0.8)
    torch.testing.assert_close(ret[:, [0, 2]], ret_c)
    assert ret[0, 1].item() == 0.0


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.7, 0.3)])
def test_gae_matches_loop_reference(gen, gamma, lam):
    bsz, resp = 6, 9
    rewards = torch.randn(bsz, resp, generator=gen, dtype=torch.float64)
    values = torch.randn(bsz, resp, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, bsz, resp)
    adv, ret = ca.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64), rtol=1e-8, atol=1e-8)


def test_gae_float32_close_to_float64(gen):
    rewards = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    values = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, 4, 16)
    a64, r64 = ca.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    a32, r32 = ca.compute_gae_advantage_return(rewards.float(), values.float(), mask.float(), 0.99, 0.95)
    assert a32.dtype == torch.float32
    torch.testing.assert_close(a32.double(), a64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r32.double(), r64, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- GRPO / RLOO
def test_grpo_two_scores_in_one_group():
    rewards = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv, ret = ca.compute_grpo_outcome_advantage(rewards, mask, np.array(["p", "p"], dtype=object))
    s = 1 / (math.sqrt(2) + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([[-s, -s], [s, 0.0]]))
    torch.testing.assert_close(ret, adv)


def test_grpo_singleton_group_keeps_score_and_no_std_variant():
    rewards = torch.tensor([[0.0, 0.4], [1.0, 0.0], [3.0, 0.0]])
    mask = torch.ones(3, 2)
    adv, _ = ca.compute_grpo_outcome_advantage(rewards, mask, ["solo", "g", "g"])
    assert adv[0, 0].item() == pytest.approx(0.4 / (1 + 1e-6))
    adv_nostd, _ = ca.compute_grpo_outcome_advantage(rewards, mask, ["solo", "g", "g"], norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(adv_nostd, torch.tensor([[0.4, 0.4], [-1.0, -1.0], [1.0, 1.0]]))


def test_grpo_equal_scores_give_zero_advantage():
    adv, _ = ca.compute_grpo_outcome_advantage(torch.ones(4, 3), torch.ones(4, 3), [0, 0, 0, 0])
    assert torch.count_nonzero(adv) == 0


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_matches_loop_reference(gen, norm):
    bsz, resp = 24, 5
    rewards = torch.zeros(bsz, resp, dtype=torch.float64)
    rewards[:, -1] = torch.randn(bsz, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, bsz, resp)
    index = [f"u{int(i)}" for i in torch.randint(0, 7, (bsz,), generator=gen)]
    adv, _ = ca.compute_grpo_outcome_advantage(rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=norm)
    ref = ref_group_norm(rewards.sum(-1).tolist(), index, norm, 1e-6)
    torch.testing.assert_close(adv, torch.tensor(ref, dtype=torch.float64)[:, None] * mask, rtol=1e-10, atol=1e-12)


def test_rloo_hand_example_and_reference(gen):
    rewards = torch.tensor([[1.0], [2.0], [6.0], [5.0]])
    adv, _ = ca.compute_rloo_outcome_advantage(rewards, torch.ones(4, 1), ["a", "a", "a", "b"])
    # a: 1 - (2+6)/2 = -3 ; 2 - 3.5 = -1.5 ; 6 - 1.5 = 4.5 ; b singleton keeps 5
    torch.testing.assert_close(adv, torch.tensor([[-3.0], [-1.5], [4.5], [5.0]]))
    bsz, resp = 20, 4
    rewards = torch.randn(bsz, resp, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, bsz, resp)
    index = [int(i) for i in torch.randint(0, 6, (bsz,), generator=gen)]
    adv, ret = ca.compute_rloo_outcome_advantage(rewards, mask, index)
    ref = ref_rloo(rewards.sum(-1).tolist(), index)
    torch.testing.assert_close(adv, torch.tensor(ref, dtype=torch.float64)[:, None] * mask)
    torch.testing.assert_close(ret, adv)


def test_group_index_must_match_batch():
    with pytest.raises(ValueError):
        ca.compute_grpo_outcome_advantage(torch.ones(3, 2), torch.ones(3, 2), ["a", "b"])
    with pytest.raises(TypeError):
        ca.compute_grpo_outcome_advantage(torch.ones(2, 2), torch.ones(2, 2), [["a"], ["b"]])


# ------------------------------------------------------------------------------- REINFORCE++
def test_reinforce_pp_hand_example():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 4.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    adv, ret = ca.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, gamma=0.5)
    # row 0: G2 = 2, G1 = 1, G0 = 1.5 ; row 1: G1 = 4, G0 = 2
    torch.testing.assert_close(ret, torch.tensor([[1.5, 1.0, 2.0], [2.0, 4.0, 0.0]], dtype=torch.float64))
    vals = torch.tensor([1.5, 1.0, 2.0, 2.0, 4.0], dtype=torch.float64)
    expect = (vals - vals.mean()) / torch.sqrt(vals.var() + 1e-8)
    torch.testing.assert_close(adv[mask.bool()], expect)
    assert adv[1, 2].item() == 0.0


def test_reinforce_pp_matches_loop_reference(gen):
    rewards = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, 5, 8)
    adv, ret = ca.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, gamma=0.9)
    ref_adv, ref_ret = ref_reinforce_pp(rewards.tolist(), mask.tolist(), 0.9)
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64))
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64), rtol=1e-8, atol=1e-8)


def test_reinforce_pp_baseline_matches_loop_reference(gen):
    bsz, resp = 12, 6
    rewards = torch.randn(bsz, resp, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, bsz, resp)
    index = [int(i) for i in torch.randint(0, 4, (bsz,), generator=gen)]
    adv, ret = ca.compute_reinforce_plus_plus_baseline_outcome_advantage(rewards, mask, index)
    centred = ref_group_norm(rewards.sum(-1).tolist(), index, False, 0.0)
    expanded = [[c] * resp for c in centred]
    ref = ref_whiten(expanded, mask.tolist())
    torch.testing.assert_close(adv, torch.tensor(ref, dtype=torch.float64), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ret, adv)


# ------------------------------------------------------------------------------- registry
def test_adv_estimator_registry():
    assert {"gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"} <= set(ca.ADV_ESTIMATORS)
    assert ca.get_adv_estimator_fn("grpo") is ca.compute_grpo_outcome_advantage
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        ca.get_adv_estimator_fn("nope")

    @ca.register_adv_est("_test_zero")
    def zero(token_level_rewards, response_mask):
        return torch.zeros_like(token_level_rewards), torch.zeros_like(token_level_rewards)

    try:
        assert ca.get_adv_estimator_fn("_test_zero") is zero
        with pytest.raises(ValueError):
            ca.register_adv_est("_test_zero")(lambda: None)
    finally:
        ca.ADV_ESTIMATORS.pop("_test_zero")


# ------------------------------------------------------------------------------- KL
def test_kl_estimators_known_values():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    d = math.log(2.0)
    assert ca.kl_penalty(logp, ref, "kl").item() == pytest.approx(d, rel=1e-6)
    assert ca.kl_penalty(logp, ref, "k1").item() == pytest.approx(d, rel=1e-6)
    assert ca.kl_penalty(ref, logp, "abs").item() == pytest.approx(d, rel=1e-6)
    assert ca.kl_penalty(logp, ref, "mse").item() == pytest.approx(0.5 * d * d, rel=1e-6)
    assert ca.kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * d * d, rel=1e-6)
    assert ca.kl_penalty(logp, ref, "low_var_kl").item() == pytest.approx(0.5 + d - 1, rel=1e-6)
    assert ca.kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + d - 1, rel=1e-6)
    with pytest.raises(ValueError):
        ca.kl_penalty(logp, ref, "full")


def test_k1_and_k3_are_unbiased_estimators_of_kl():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    for name in ("k1", "k3"):
        expectation = float((p * ca.kl_penalty(p.log(), q.log(), name)).sum())
        assert expectation == pytest.approx(exact, rel=1e-12)
    k2 = float((p * ca.kl_penalty(p.log(), q.log(), "k2")).sum())
    assert k2 != pytest.approx(exact, rel=1e-3)


def test_k3_is_clamped():
    big = ca.kl_penalty(torch.tensor([0.0]), torch.tensor([50.0]), "low_var_kl")
    assert big.item() == 10.0
    assert torch.isfinite(ca.kl_penalty(torch.tensor([60.0]), torch.tensor([0.0]), "k3")).all()


def test_straight_through_kl_has_k2_gradient_and_forward_value():
    logp = torch.tensor([-0.2, -1.5], requires_grad=True)
    ref = torch.tensor([-0.9, -0.4])
    out = ca.kl_penalty(logp, ref, "k3+")
    torch.testing.assert_close(out.detach(), ca.kl_penalty(logp.detach(), ref, "k3"))
    out.sum().backward()
    torch.testing.assert_close(logp.grad, (logp - ref).detach())


def test_kl_loss_aggregates_estimator():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss = ca.compute_kl_loss(logp, ref, mask, kl_loss_type="kl", loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx(0.25)
    loss3 = ca.compute_kl_loss(logp, ref, mask)
    assert loss3.item() == pytest.approx((math.exp(-0.5) + 0.5 - 1) / 2, rel=1e-6)


def test_fixed_and_adaptive_kl_controllers():
    fixed = ca.FixedKLController(0.05)
    fixed.update(10.0, 100)
    assert fixed.value == 0.05
    ada = ca.AdaptiveKLController(init_kl_coef=0.1, target_kl=0.05, horizon=100)
    ada.update(current_kl=0.1, n_steps=10)        # error clipped to +0.2 -> x1.02
    assert ada.value == pytest.approx(0.102)
    ada.update(current_kl=0.05, n_steps=10)       # on target -> unchanged
    assert ada.value == pytest.approx(0.102)
    ada.update(current_kl=0.045, n_steps=50)      # error -0.1 -> x(1 - 0.05)
    assert ada.value == pytest.approx(0.102 * 0.95)
    ada.update(current_kl=float("nan"), n_steps=10)
    assert ada.value == pytest.approx(0.102 * 0.95)
    restored = ca.AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(ada.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (ada.value, 0.05, 100.0)


def test_get_kl_controller_from_config():
    from omegaconf import OmegaConf

    ctrl = ca.get_kl_controller(OmegaConf.create({"kl_ctrl": {"type": "adaptive", "kl_coef": 0.2,
                                                              "target_kl": 0.1, "horizon": 1000}}))
    assert isinstance(ctrl, ca.AdaptiveKLController) and ctrl.value == 0.2
    ctrl = ca.get_kl_controller({"type": "fixed", "kl_coef": 0.3})
    assert isinstance(ctrl, ca.FixedKLController) and ctrl.value == 0.3
    with pytest.raises(ValueError):
        ca.get_kl_controller({"type": "pid"})
    with pytest.raises(ValueError):
        ca.get_kl_controller({"type": "adaptive", "kl_coef": 0.1})


# ------------------------------------------------------------------------------- losses
def test_agg_loss_modes_hand_example():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert ca.agg_loss(loss, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert ca.agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(3.5)
    assert ca.agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(2.75)
    assert ca.agg_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 6)
    assert ca.agg_loss(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=7).item() == pytest.approx(0.5)
    for mode in ca.LOSS_AGG_MODES:
        assert ca.agg_loss(loss, torch.zeros_like(mask), mode).item() == 0.0
    with pytest.raises(ValueError):
        ca.agg_loss(loss, mask, "token-sum")


@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
def test_agg_loss_matches_loop_reference(gen, mode):
    loss = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, 7, 5)
    assert ca.agg_loss(loss, mask, mode).item() == pytest.approx(ref_agg(loss.tolist(), mask.tolist(), mode), rel=1e-12)


def test_policy_loss_hand_example():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 5.0, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    mask = torch.ones(1, 4)
    loss, clipfrac, ppo_kl, lower = ca.compute_policy_loss(old, new, adv, mask, cliprange=0.2, clip_ratio_c=3.0)
    # token 0: A>0, ratio 1.5 -> -1.2 (clipped) ; token 1: ratio 0.5 -> -0.5 (unclipped side is larger)
    # token 2: A<0, ratio 5 -> max(5, 0.8) = 5 -> dual clip min(5, 3) = 3 ; token 3: ratio 1.1 -> 2.2
    expected = (-1.2 - 0.5 + 3.0 + 2.2) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 4)
    assert lower.item() == pytest.approx(1 / 4)
    assert ppo_kl.item() == pytest.approx(-float(new.mean()), rel=1e-6)


def test_policy_loss_asymmetric_clip():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.25, 0.85]]))
    adv = torch.tensor([[1.0, -1.0]])
    loss, clipfrac, _, _ = ca.compute_policy_loss(old, new, adv, torch.ones(1, 2),
                                                  cliprange_low=0.1, cliprange_high=0.28)
    # token 0: 1.25 < 1.28 not clipped -> -1.25 ; token 1: A<0, ratio .85 < .9 -> max(.85, .9) = .9
    assert loss.item() == pytest.approx((-1.25 + 0.9) / 2, rel=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
def test_policy_loss_matches_loop_reference(gen, mode):
    bsz, resp = 6, 7
    old = torch.randn(bsz, resp, generator=gen, dtype=torch.float64) * 0.3 - 1
    new = old + torch.randn(bsz, resp, generator=gen, dtype=torch.float64) * 0.8
    adv = torch.randn(bsz, resp, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, bsz, resp)
    loss, clipfrac, ppo_kl, lower = ca.compute_policy_loss(old, new, adv, mask, cliprange=0.2, cliprange_low=0.15,
                                                           cliprange_high=0.3, clip_ratio_c=2.5, loss_agg_mode=mode)
    losses, clips, lowers, kls = [], [], [], []
    for i in range(bsz):
        row = []
        for t in range(resp):
            term, clipped, low = ref_policy_loss_terms(old[i, t].item(), new[i, t].item(), adv[i, t].item(), 0.15, 0.3, 2.5)
            row.append(term)
            if mask[i, t]:
                clips.append(clipped)
                lowers.append(low)
                kls.append(old[i, t].item() - new[i, t].item())
        losses.append(row)
    assert loss.item() == pytest.approx(ref_agg(losses, mask.tolist(), mode), rel=1e-10)
    assert clipfrac.item() == pytest.approx(sum(clips) / len(clips))
    assert lower.item() == pytest.approx(sum(lowers) / len(lowers))
    assert ppo_kl.item() == pytest.approx(sum(kls) / len(kls), rel=1e-10)


def test_policy_loss_gradient_vanishes_when_clipped():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 1.05]])).requires_grad_(True)
    adv = torch.ones(1, 2)
    loss, *_ = ca.compute_policy_loss(old, new, adv, torch.ones(1, 2), cliprange=0.2)
    loss.backward()
    assert new.grad[0, 0].item() == 0.0
    assert new.grad[0, 1].item() == pytest.approx(-1.05 / 2, rel=1e-6)  # d(-A r)/dlogp = -A r, token-mean /2


def test_policy_loss_rejects_bad_dual_clip():
    with pytest.raises(ValueError):
        ca.compute_policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), clip_ratio_c=1.0)
    assert ca.get_policy_loss_fn("vanilla") is ca.compute_policy_loss


def test_value_loss_hand_example_and_reference(gen):
    vpred = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.0, 0.0, 2.0]])
    returns = torch.tensor([[1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, clipfrac = ca.compute_value_loss(vpred, returns, values, mask, cliprange_value=0.5)
    # token 0: pred 1 -> clipped 0.5 ; losses (0)^2 vs (-0.5)^2 -> max 0.25, clipped branch active
    # token 1: pred 0 unclipped; (1)^2 -> 1
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1.0) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    loss_nc, frac_nc = ca.compute_value_loss(vpred, returns, values, mask, cliprange_value=None)
    assert loss_nc.item() == pytest.approx(0.5 * (0.0 + 1.0) / 2) and frac_nc.item() == 0.0

    bsz, resp = 5, 6
    vpred = torch.randn(bsz, resp, generator=gen, dtype=torch.float64)
    values = torch.randn(bsz, resp, generator=gen, dtype=torch.float64)
    returns = torch.randn(bsz, resp, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, bsz, resp)
    loss, _ = ca.compute_value_loss(vpred, returns, values, mask, 0.2, "seq-mean-token-mean")
    ref = []
    for i in range(bsz):
        row = []
        for t in range(resp):
            vp, v, r = vpred[i, t].item(), values[i, t].item(), returns[i, t].item()
            vc = min(max(vp, v - 0.2), v + 0.2)
            row.append(max((vp - r) ** 2, (vc - r) ** 2))
        ref.append(row)
    assert loss.item() == pytest.approx(0.5 * ref_agg(ref, mask.tolist(), "seq-mean-token-mean"), rel=1e-10)


def test_entropy_loss_is_masked_mean():
    ent = torch.tensor([[1.0, 2.0, 100.0]])
    assert ca.compute_entropy_loss(ent, torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.5)


def test_estimators_accept_integer_rewards_and_bf16_values():
    rewards = torch.tensor([[0, 1], [0, 3]])
    mask = torch.ones(2, 2, dtype=torch.long)
    for fn in (ca.compute_grpo_outcome_advantage, ca.compute_rloo_outcome_advantage,
               ca.compute_reinforce_plus_plus_baseline_outcome_advantage):
        adv, _ = fn(rewards, mask, ["g", "g"])
        assert adv.dtype == torch.float32 and adv[1, 0].item() > 0.5  # not truncated to an int
    adv, _ = ca.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, 1.0)
    assert adv.dtype == torch.float32
    values = torch.full((2, 2), 0.1, dtype=torch.bfloat16)
    adv, ret = ca.compute_gae_advantage_return(rewards.float(), values, mask, 1.0, 1.0)
    assert ret.dtype == torch.float32  # accumulated in float32
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0], [3.0, 3.0]]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(gen):
    rewards = torch.randn(8, 12, generator=gen)
    values = torch.randn(8, 12, generator=gen)
    mask = random_mask(gen, 8, 12).float()
    index = [i // 2 for i in range(8)]
    cpu = ca.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    gpu = ca.compute_gae_advantage_return(rewards.cuda(), values.cuda(), mask.cuda(), 0.99, 0.95)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ca.compute_grpo_outcome_advantage(rewards.cuda(), mask.cuda(), index)[0].cpu(),
                               ca.compute_grpo_outcome_advantage(rewards, mask, index)[0])
    old, new = values * 0.1, values * 0.12
    cpu_loss = ca.compute_policy_loss(old, new, rewards, mask)
    gpu_loss = ca.compute_policy_loss(old.cuda(), new.cuda(), rewards.cuda(), mask.cuda())
    for a, b in zip(cpu_loss, gpu_loss):
        torch.testing.assert_close(b.cpu(), a)
