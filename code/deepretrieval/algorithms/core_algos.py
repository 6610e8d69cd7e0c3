r"""Core RL algorithms: advantage estimators, KL estimators and controllers, PPO losses.

Every function is a pure tensor function (no module state, no I/O). Shapes: ``B`` samples,
``R`` response tokens. ``response_mask`` is 1 on tokens the policy generated and is trained on
(through EOS inclusive) and 0 on right padding and on masked-out tokens inside a response (e.g.
text returned by a tool). Outcome rewards sit on the last valid response token
(:func:`deepretrieval.trainer.step.place_outcome_reward`).

Notation used in the docstrings: r_t token reward, V_t value, m_t response mask,
\gamma discount, \lambda GAE parameter, s = sum_t r_t the sequence score, g(i) the group
(prompt uid) of sample i, \rho_t = \pi_\theta(a_t)/\pi_{old}(a_t) the importance ratio.

Registries: :data:`ADV_ESTIMATORS` (``register_adv_est`` / ``get_adv_estimator_fn``),
:data:`KL_ESTIMATORS` (used by :func:`kl_penalty`), :data:`POLICY_LOSSES`
(``get_policy_loss_fn``) and :data:`LOSS_AGG_MODES`.
"""

from __future__ import annotations

import inspect

import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from deepretrieval.algorithms.utils import clip_by_value, masked_mean, masked_sum, masked_var, masked_whiten

logger = logging.getLogger(__name__)

__all__ = [
    "ADV_ESTIMATORS", "KL_ESTIMATORS", "POLICY_LOSSES", "LOSS_AGG_MODES",
    "register_adv_est", "get_adv_estimator_fn", "register_policy_loss", "get_policy_loss_fn",
    "compute_gae_advantage_return", "compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage", "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "kl_penalty", "compute_kl_loss", "FixedKLController", "AdaptiveKLController", "get_kl_controller",
    "agg_loss", "compute_policy_loss", "compute_value_loss", "compute_entropy_loss",
    "masked_mean", "masked_sum", "masked_var", "masked_whiten", "clip_by_value",
]

# ---------------------------------------------------------------------------------------------
# registries
# ---------------------------------------------------------------------------------------------

ADV_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def register_adv_est(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register an advantage estimator under ``name`` (names are unique)."""

    def decorator(fn: Callable) -> Callable:
        if name in ADV_ESTIMATORS and ADV_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADV_ESTIMATORS[name] = fn
        return fn

    return decorator


def get_adv_estimator_fn(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The registered advantage estimator called ``name`` (ValueError lists the known ones)."""
    name = str(getattr(name, "value", name))
    if name not in ADV_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ADV_ESTIMATORS)}")
    return ADV_ESTIMATORS[name]


def adv_estimator_inputs(name: str) -> frozenset[str]:
    """Which per-step inputs a registered estimator takes, read from its signature (the same names
    the driver passes, trainer.step.compute_advantage): ``values`` (it needs a critic, like GAE) and
    ``index`` (it compares the samples of one prompt, like GRPO/RLOO: n >= 2). So a newly registered
    estimator gets the critic and the group check it needs without edits elsewhere."""
    params = inspect.signature(get_adv_estimator_fn(name)).parameters
    return frozenset(p for p in ("values", "index") if p in params)


POLICY_LOSSES: dict[str, Callable[..., tuple]] = {}


def register_policy_loss(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register a policy loss under ``name``."""

    def decorator(fn: Callable) -> Callable:
        if name in POLICY_LOSSES and POLICY_LOSSES[name] is not fn:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def get_policy_loss_fn(name: str) -> Callable[..., tuple]:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; known: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


# ---------------------------------------------------------------------------------------------
# grouping helpers (GRPO / RLOO / REINFORCE++-baseline)
# ---------------------------------------------------------------------------------------------


def _group_ids(index: Sequence[Hashable] | np.ndarray | torch.Tensor, batch_size: int,
               device: torch.device) -> tuple[torch.Tensor, int]:
    """Map prompt ids (any hashable) to dense group ids 0..G-1 in order of first appearance."""
    if isinstance(index, torch.Tensor):
        index = index.tolist()
    items = list(index)
    if len(items) != batch_size:
        raise ValueError(f"index has {len(items)} entries for a batch of {batch_size}")
    mapping: dict[Any, int] = {}
    try:
        ids = [mapping.setdefault(x, len(mapping)) for x in items]
    except TypeError as exc:
        raise TypeError("group index entries must be hashable (e.g. uid strings)") from exc
    return torch.tensor(ids, dtype=torch.long, device=device), len(mapping)


def _group_stats(scores: torch.Tensor, gid: torch.Tensor, num_groups: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (group mean, group unbiased std, group size), computed in float64.

    Singleton groups get mean 0 and std 1 so that their normalised advantage equals the score.
    """
    s = scores.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64, device=s.device).index_add_(0, gid, torch.ones_like(s))
    total = torch.zeros(num_groups, dtype=torch.float64, device=s.device).index_add_(0, gid, s)
    mean = total / count
    centered = s - mean[gid]
    sq = torch.zeros(num_groups, dtype=torch.float64, device=s.device).index_add_(0, gid, centered * centered)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return mean[gid], std[gid], count[gid]


# ---------------------------------------------------------------------------------------------
# advantage estimators
# ---------------------------------------------------------------------------------------------


@register_adv_est("gae")
def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalised Advantage Estimation (Schulman et al. 2016) over the valid tokens.

    Backwards over t = R-1 .. 0, starting from V_next = 0, A_next = 0:
        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next
        if m_t = 1:  V_next <- V_t,  A_next <- A_t
        else:        V_next, A_next carried over unchanged (the position is skipped)
    so masked positions (padding, tool output inside a response) are transparent: the recursion
    links each valid token to the next *valid* token, and rewards on masked positions are ignored.
        returns_t   = A_t + V_t                       (the value target, before whitening)
        advantages  = whiten_m(A)                     (mean/unbiased var over the mask)
    Both outputs are zero where m_t = 0. With gamma = lam = 1, returns_t = sum_{t' >= t} r_{t'}.

    Args:
        token_level_rewards, values, response_mask: [B, R].
    Returns:
        (advantages, returns), each [B, R].
    """
    with torch.no_grad():
        # accumulate in at least float32 (bf16 values would lose the recursion's small terms)
        dtype = torch.promote_types(values.dtype, torch.float32)
        values = values.to(dtype)
        mask = response_mask.to(dtype)
        # time-major contiguous copies: each step then reads one contiguous row (~8x faster on CPU
        # than strided column access)
        rewards_t = token_level_rewards.to(dtype).t().contiguous()
        values_t = values.t().contiguous()
        valid_t = response_mask.bool().t().contiguous()
        next_values = torch.zeros_like(values_t[0])
        last_gae = torch.zeros_like(values_t[0])
        advantages_t = torch.empty_like(values_t)
        gamma_lam = gamma * lam
        for t in range(values_t.shape[0] - 1, -1, -1):
            gae_t = rewards_t[t] + gamma * next_values - values_t[t] + gamma_lam * last_gae
            advantages_t[t] = gae_t
            next_values = torch.where(valid_t[t], values_t[t], next_values)
            last_gae = torch.where(valid_t[t], gae_t, last_gae)
        advantages = advantages_t.t()
        returns = (advantages + values) * mask
        advantages = masked_whiten(advantages, response_mask) * mask
    return advantages, returns


@register_adv_est("grpo")
def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Hashable] | np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""GRPO outcome advantage (Shao et al. 2024), broadcast to every valid token.

        s_i = sum_t r_{i,t}
        A_i = (s_i - mean_{j in g(i)} s_j) / (std_{j in g(i)} s_j + epsilon)   if norm_adv_by_std_in_grpo
        A_i =  s_i - mean_{j in g(i)} s_j                                      otherwise (Dr. GRPO)
        advantages_{i,t} = returns_{i,t} = A_i * m_{i,t}
    std is the unbiased (n-1) standard deviation. A singleton group uses mean 0 and std 1, so its
    advantage is its raw score (the group carries no baseline information).
    Example: scores [1, 3] in one group -> mean 2, std sqrt(2) -> A = [-1, 1]/sqrt(2).

    Args:
        index: group key per sample (prompt ``uid``), length B.
    """
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        gid, num_groups = _group_ids(index, scores.shape[0], scores.device)
        mean, std, _ = _group_stats(scores, gid, num_groups)
        adv = scores.to(torch.float64) - mean
        if norm_adv_by_std_in_grpo:
            adv = adv / (std + epsilon)
        dtype = torch.promote_types(token_level_rewards.dtype, torch.float32)
        adv = adv.to(dtype).unsqueeze(-1) * response_mask.to(dtype)
    return adv, adv


@register_adv_est("rloo")
def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Hashable] | np.ndarray,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""REINFORCE leave-one-out (Ahmadian et al. 2024).

        A_i = s_i - (1/(n-1)) sum_{j in g(i), j != i} s_j  =  n/(n-1) * (s_i - mean_{g(i)} s)
    for a group of size n >= 2; a singleton group keeps A_i = s_i (no baseline available).
        advantages_{i,t} = returns_{i,t} = A_i * m_{i,t}
    ``epsilon`` is accepted for signature compatibility with the other group estimators.
    """
    del epsilon
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        gid, num_groups = _group_ids(index, scores.shape[0], scores.device)
        mean, _, count = _group_stats(scores, gid, num_groups)
        s = scores.to(torch.float64)
        adv = torch.where(count > 1, (s - mean) * count / (count - 1).clamp(min=1), s)
        dtype = torch.promote_types(token_level_rewards.dtype, torch.float32)
        adv = adv.to(dtype).unsqueeze(-1) * response_mask.to(dtype)
    return adv, adv


@register_adv_est("reinforce_plus_plus")
def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""REINFORCE++ (Hu 2025): discounted return-to-go, whitened over the batch.

    Backwards with G_next = 0:
        G_t = r_t + gamma * G_next,  and G_next <- G_t if m_t = 1 (else carried over unchanged)
        returns_t    = G_t * m_t
        advantages_t = whiten_m(G)_t * m_t
    Masked positions are skipped the same way as in GAE.
    """
    with torch.no_grad():
        dtype = torch.promote_types(token_level_rewards.dtype, torch.float32)
        mask = response_mask.to(dtype)
        rewards_t = token_level_rewards.to(dtype).t().contiguous()
        valid_t = response_mask.bool().t().contiguous()
        returns_t = torch.empty_like(rewards_t)
        running = torch.zeros_like(rewards_t[0])
        for t in range(rewards_t.shape[0] - 1, -1, -1):
            g_t = rewards_t[t] + gamma * running
            returns_t[t] = g_t
            running = torch.where(valid_t[t], g_t, running)
        returns = returns_t.t() * mask
        advantages = masked_whiten(returns, response_mask) * mask
    return advantages, returns


@register_adv_est("reinforce_plus_plus_baseline")
def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Hashable] | np.ndarray,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""REINFORCE++-baseline: group-mean baseline, then batch whitening over tokens.

        b_i = s_i - mean_{j in g(i)} s_j          (singleton group: mean 0, b_i = s_i)
        advantages_{i,t} = returns_{i,t} = whiten_m(b_i * m_{i,t})_{i,t} * m_{i,t}
    where whiten_m takes the mean and unbiased variance over all valid tokens of the batch (so
    longer responses weigh more, as in the reference implementation).
    """
    del epsilon
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        gid, num_groups = _group_ids(index, scores.shape[0], scores.device)
        mean, _, _ = _group_stats(scores, gid, num_groups)
        dtype = torch.promote_types(token_level_rewards.dtype, torch.float32)
        mask = response_mask.to(dtype)
        b = (scores.to(torch.float64) - mean).to(dtype).unsqueeze(-1) * mask
        adv = masked_whiten(b, response_mask) * mask
    return adv, adv


# ---------------------------------------------------------------------------------------------
# KL estimators and controllers
# ---------------------------------------------------------------------------------------------


def _kl_k1(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    return logprob - ref_logprob


def _kl_abs(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    return (logprob - ref_logprob).abs()


def _kl_k2(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprob - ref_logprob).square()


def _kl_k3(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    log_ratio = torch.clamp(ref_logprob - logprob, min=-20.0, max=20.0)
    kld = torch.exp(log_ratio) - log_ratio - 1.0
    return torch.clamp(kld, min=-10.0, max=10.0)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": _kl_k1, "k1": _kl_k1,
    "abs": _kl_abs,
    "mse": _kl_k2, "k2": _kl_k2,
    "low_var_kl": _kl_k3, "k3": _kl_k3,
}


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str = "kl") -> torch.Tensor:
    r"""Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (Schulman's estimators).

    With delta = log pi(a) - log pi_ref(a) for a ~ pi:
        "kl"  / "k1":         delta                                   (unbiased, high variance)
        "abs":                |delta|
        "mse" / "k2":         0.5 * delta^2
        "low_var_kl" / "k3":  exp(-delta) + delta - 1                 (unbiased, >= 0, low variance)
                              with -delta clamped to [-20, 20] and the result to [-10, 10]
    A trailing "+" (e.g. "k3+") keeps the estimator's value but takes the gradient of k2
    (straight-through: the k2 gradient is the unbiased gradient of KL for on-policy samples).
    Returns a tensor of the input's shape; masking is the caller's job.
    """
    name = kl_penalty
    straight_through = name.endswith("+")
    if straight_through:
        name = name[:-1]
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl_penalty!r}; known: {sorted(KL_ESTIMATORS)} (+ optional '+')")
    forward = KL_ESTIMATORS[name](logprob, ref_logprob)
    if not straight_through:
        return forward
    backward = _kl_k2(logprob, ref_logprob)
    return backward - backward.detach() + forward.detach()


def compute_kl_loss(
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    kl_loss_type: str = "low_var_kl",
    loss_agg_mode: str = "token-mean",
) -> torch.Tensor:
    r"""KL as a loss term (GRPO style): L_KL = agg_m( kl_penalty(log_prob, ref_log_prob) ).

    The actor adds ``kl_loss_coef * L_KL`` to the policy loss; gradients flow through ``log_prob``.
    """
    kld = kl_penalty(log_prob, ref_log_prob, kl_penalty=kl_loss_type)
    return agg_loss(kld, response_mask, loss_agg_mode)


class FixedKLController:
    r"""Constant KL coefficient: beta_k = kl_coef for every step."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept for interface parity with the adaptive controller)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    r"""Adaptive KL coefficient (Ziegler et al. 2019):

        e      = clip(KL_current / KL_target - 1, -0.2, 0.2)
        beta  <- beta * (1 + e * n_steps / horizon)

    Non-finite ``current_kl`` values are ignored (logged) so one bad batch cannot poison beta.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float):
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"target_kl and horizon must be positive (got {target_kl}, {horizon})")
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            logger.warning("AdaptiveKLController: ignoring non-finite KL %r", current_kl)
            return
        proportional_error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


def get_kl_controller(cfg: Mapping[str, Any]) -> FixedKLController | AdaptiveKLController:
    """Build a controller from the ``algorithm.kl_ctrl`` section (or the ``algorithm`` section): a
    mapping or DictConfig (whose ``get`` gives the default for a missing key, struct mode included).

    Keys: type ("fixed" | "adaptive"), kl_coef, target_kl, horizon.
    """
    inner = cfg.get("kl_ctrl")
    if inner is not None:
        cfg = inner
    ctrl_type = cfg.get("type", "fixed")
    kl_coef = float(cfg.get("kl_coef", 0.001))
    if ctrl_type == "fixed":
        return FixedKLController(kl_coef)
    if ctrl_type == "adaptive":
        target_kl = cfg.get("target_kl")
        horizon = cfg.get("horizon")
        if target_kl is None or horizon is None:
            raise ValueError("adaptive KL controller needs kl_ctrl.target_kl and kl_ctrl.horizon")
        return AdaptiveKLController(kl_coef, float(target_kl), float(horizon))
    raise ValueError(f"unknown kl_ctrl.type {ctrl_type!r}; expected 'fixed' or 'adaptive'")


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
             loss_scale_factor: float | None = None) -> torch.Tensor:
    r"""Aggregate a [B, R] per-token loss into a scalar.

    With m the mask, N_i = sum_t m_{i,t}, and S = {i : N_i > 0} the sequences with a valid token:
        "token-mean":              sum_{i,t} m l / sum_{i,t} m
        "seq-mean-token-sum":      (1/|S|) sum_{i in S} sum_t m_{i,t} l_{i,t}
        "seq-mean-token-mean":     (1/|S|) sum_{i in S} (sum_t m_{i,t} l_{i,t}) / N_i
        "seq-mean-token-sum-norm": (1/|S|) sum_{i in S} (sum_t m_{i,t} l_{i,t}) / C
                                   with C = loss_scale_factor or R (Dr. GRPO's constant horizon)
    Empty masks give 0. (verl's "seq-mean-token-sum-norm" sums over sequences instead of taking the
    mean; here it is the mean so that it is batch-size independent like the other seq modes.)
    """
    mask = loss_mask.bool()
    if loss_agg_mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; known: {LOSS_AGG_MODES}")
    token_sum = masked_sum(loss_mat, mask, dim=-1)
    n_tokens = mask.sum(dim=-1)
    seq_valid = n_tokens > 0
    if loss_agg_mode == "seq-mean-token-sum":
        seq_losses = token_sum
    elif loss_agg_mode == "seq-mean-token-mean":
        seq_losses = token_sum / n_tokens.to(loss_mat.dtype).clamp(min=1)
    else:
        scale = float(loss_scale_factor) if loss_scale_factor is not None else float(loss_mat.shape[-1])
        seq_losses = token_sum / scale
    return masked_mean(seq_losses, seq_valid)


@register_policy_loss("vanilla")
def compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float = 0.2,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    clip_ratio_c: float | None = 3.0,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""PPO clipped surrogate with asymmetric clip (DAPO clip-higher) and dual clip (Ye et al. 2020).

        rho_t   = exp(clamp(log_prob_t - old_log_prob_t, -20, 20))
        L^clip_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))
        L_t      = min(L^clip_t, -A_t * c)   if A_t < 0      (dual clip, c = clip_ratio_c > 1)
                   L^clip_t                  otherwise
        pg_loss  = agg_m(L)
    eps_low / eps_high default to ``cliprange``. ``clip_ratio_c=None`` disables the dual clip:
    L_t = L^clip_t for every token (the plain PPO-clip loss of the original DeepRetrieval/verl
    0.1, whose policy loss had no dual clip), and pg_clipfrac_lower is 0.
    Metrics: pg_clipfrac = mean_m[ -A clip(rho) > -A rho ] (the clipped branch is active),
             ppo_kl = mean_m(old_log_prob - log_prob),
             pg_clipfrac_lower = mean_m[ A < 0 and L^clip > -A c ] (the dual clip is active).
    Returns (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower).
    """
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 for dual-clip PPO (or None to disable it), got {clip_ratio_c}")
    eps_low = cliprange if cliprange_low is None else cliprange_low
    eps_high = cliprange if cliprange_high is None else cliprange_high

    neg_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(neg_approx_kl)
    ppo_kl = masked_mean(-neg_approx_kl, response_mask)

    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)

    if clip_ratio_c is None:
        pg_loss = agg_loss(clip_pg_losses1, response_mask, loss_agg_mode)
        return pg_loss, pg_clipfrac, ppo_kl, torch.zeros_like(pg_clipfrac)

    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.minimum(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean((torch.gt(clip_pg_losses1, pg_losses3) & (advantages < 0)).float(),
                                    response_mask)

    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float | None,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Clipped value loss (PPO2):

        V^clip_t = clip(V^pred_t, V^old_t - eps_v, V^old_t + eps_v)
        L_t      = max((V^pred_t - R_t)^2, (V^clip_t - R_t)^2)
        vf_loss  = 0.5 * agg_m(L)
        vf_clipfrac = mean_m[ (V^clip - R)^2 > (V^pred - R)^2 ]
    ``cliprange_value=None`` disables clipping (L_t = (V^pred_t - R_t)^2).
    Returns (vf_loss, vf_clipfrac).
    """
    vf_losses1 = (vpreds - returns).square()
    if cliprange_value is None:
        vf_losses2 = vf_losses1
    else:
        vpred_clipped = clip_by_value(vpreds, values - cliprange_value, values + cliprange_value)
        vf_losses2 = (vpred_clipped - returns).square()
    clipped = torch.maximum(vf_losses1, vf_losses2)
    vf_loss = 0.5 * agg_loss(clipped, response_mask, loss_agg_mode)
    vf_clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1).float(), response_mask)
    return vf_loss, vf_clipfrac


def compute_entropy_loss(entropy: torch.Tensor, response_mask: torch.Tensor,
                         loss_agg_mode: str = "token-mean") -> torch.Tensor:
    r"""Mean policy entropy H = agg_m(entropy_t); the actor subtracts ``entropy_coeff * H``."""
    return agg_loss(entropy, response_mask, loss_agg_mode)
