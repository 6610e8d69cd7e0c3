"""RL algorithms: advantage estimators, KL estimators/controllers and PPO losses (pure tensor functions)."""

from deepretrieval.algorithms.core_algos import (  # noqa: F401
    ADV_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    AdaptiveKLController,
    FixedKLController,
    agg_loss,
    compute_entropy_loss,
    compute_gae_advantage_return,
    compute_grpo_outcome_advantage,
    compute_kl_loss,
    compute_policy_loss,
    compute_reinforce_plus_plus_baseline_outcome_advantage,
    compute_reinforce_plus_plus_outcome_advantage,
    compute_rloo_outcome_advantage,
    compute_value_loss,
    get_adv_estimator_fn,
    get_kl_controller,
    get_policy_loss_fn,
    kl_penalty,
    register_adv_est,
    register_policy_loss,
)
from deepretrieval.algorithms.utils import (  # noqa: F401
    clip_by_value,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
