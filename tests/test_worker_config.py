"""Typed worker configuration (deepretrieval.workers.config): defaults equal to the YAML's, strict
building, the per-worker views, and algorithm names taken from the core_algos registries."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from deepretrieval.algorithms import core_algos
from deepretrieval.trainer.config import ConfigError, build_worker_config, compose_config, default_config, uses_critic
from deepretrieval.workers.config import (
    ActorRolloutRefConfig,
    CriticConfig,
    FSDPConfig,
    OptimConfig,
    PolicyLossConfig,
    RefConfig,
    WorkerConfig,
    actor_view,
    from_dict,
    per_rank_batch_config,
    ref_fsdp_config,
    ref_view,
    yaml_fields,
)

from test_trainer_config import SMALL  # noqa: E402  (the overrides of a valid 2-worker run)



def _plain(value):
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def _compare_defaults(instance, section: dict, where: str, seen: list) -> None:
    """Every YAML key of `section` is a field of the default `instance` with the same value, and back."""
    names = [f.name for f in yaml_fields(type(instance))]
    assert sorted(section) == sorted(names), f"{where}: YAML keys {sorted(section)} != fields {sorted(names)}"
    for f in yaml_fields(type(instance)):
        default, yaml_value = getattr(instance, f.name), section[f.name]
        if dataclasses.is_dataclass(default):
            _compare_defaults(default, yaml_value, f"{where}.{f.name}", seen)
        else:
            assert _plain(default) == _plain(yaml_value), f"{where}.{f.name}: {default!r} != YAML {yaml_value!r}"
            assert type(default) is type(yaml_value) or default is None or yaml_value is None or \
                isinstance(default, (int, float)) and isinstance(yaml_value, (int, float)) or \
                isinstance(default, tuple), f"{where}.{f.name}: type {type(default)} != {type(yaml_value)}"
            seen.append(f"{where}.{f.name}")


def test_dataclass_defaults_equal_the_yaml_defaults():
    cfg = default_config()
    cfg.data.train_files = "x"
    cfg.actor_rollout_ref.model.path = None  # '???' in the YAML: required, None in the dataclass
    resolved = OmegaConf.to_container(cfg, resolve=True)
    seen: list = []
    _compare_defaults(ActorRolloutRefConfig(), resolved["actor_rollout_ref"], "actor_rollout_ref", seen)
    _compare_defaults(CriticConfig(), resolved["critic"], "critic", seen)
    assert len(seen) > 90  # every leaf of both sections was compared
    assert "critic.optim.lr" in seen and CriticConfig().optim.lr == 1.0e-5 != OptimConfig().lr


def test_from_dict_rejects_unknown_keys_and_builds_nested_sections():
    with pytest.raises(ConfigError) as info:
        from_dict(CriticConfig, {"optim": {"warmup_stile": "cosine"}}, "critic")
    assert info.value.key == "critic.optim.warmup_stile" and "did you mean 'critic.optim.warmup_style'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        from_dict(ActorRolloutRefConfig, {"actor": 3}, "actor_rollout_ref")
    assert info.value.key == "actor_rollout_ref.actor" and "must be a section" in str(info.value)
    built = from_dict(ActorRolloutRefConfig, {"actor": {"optim": {"betas": [0.8, 0.9]}},
                                              "model": {"target_modules": ["q_proj", "v_proj"]}})
    assert built.actor.optim == OptimConfig(betas=(0.8, 0.9))  # YAML lists become tuples; the rest defaults
    assert built.model.target_modules == ("q_proj", "v_proj")
    assert from_dict(RefConfig, built.ref) is built.ref


def test_from_dict_rejects_scalars_of_the_wrong_type_and_accepts_an_int_for_a_float():
    cases = [({"optim": {"lr": "1e-5"}}, "actor.optim.lr", "must be float, got '1e-5' (str)"),
             ({"ppo_epochs": 1.5}, "actor.ppo_epochs", "must be int, got 1.5 (float)"),
             ({"ppo_epochs": True}, "actor.ppo_epochs", "must be int"),  # a bool is not a count
             ({"use_kl_loss": "false"}, "actor.use_kl_loss", "must be bool, got 'false' (str)"),
             ({"ppo_micro_batch_size_per_gpu": "4"}, "actor.ppo_micro_batch_size_per_gpu", "must be int or null"),
             ({"loss_agg_mode": 1}, "actor.loss_agg_mode", "must be str")]
    for section, key, message in cases:
        with pytest.raises(ConfigError) as info:
            from_dict(ActorRolloutRefConfig, {"actor": section}, "actor_rollout_ref")
        assert info.value.key == f"actor_rollout_ref.{key}" and message in str(info.value), (section, str(info.value))
    built = from_dict(ActorRolloutRefConfig, {"actor": {"optim": {"lr": 1}, "clip_ratio_low": None,
                                                        "ppo_micro_batch_size_per_gpu": 4},
                                              "model": {"target_modules": "all-linear", "lora_alpha": 32}})
    assert built.actor.optim.lr == 1 and built.actor.clip_ratio_low is None and built.model.lora_alpha == 32
    # a Union of scalars takes any member (the HF rollout's `compile`: false, true or a mode's name)
    from deepretrieval.workers.config import HFRolloutConfig

    assert from_dict(HFRolloutConfig, {"compile": "reduce-overhead"}).compile == "reduce-overhead"
    with pytest.raises(ConfigError, match="must be bool or str"):
        from_dict(HFRolloutConfig, {"compile": 2})


def test_worker_config_from_the_composed_config():
    cfg = compose_config(SMALL + ["actor_rollout_ref.rollout.log_prob_micro_batch_size=6",
                                  "actor_rollout_ref.ref.fsdp_config.param_offload=true",
                                  "actor_rollout_ref.actor.fsdp_config.mixed_precision=fp32",
                                  "actor_rollout_ref.model.use_remove_padding=true", "trainer.seed=7",
                                  "critic.ppo_micro_batch_size_per_gpu=null", "critic.ppo_micro_batch_size=4"])
    wc = build_worker_config(cfg, total_training_steps=12)
    assert isinstance(wc, WorkerConfig) and (wc.seed, wc.deterministic, wc.tokenizer) == (7, False, None)
    assert wc.actor_rollout_ref.actor.optim.total_training_steps == 12 == wc.critic.optim.total_training_steps
    assert wc.critic.model.path == "some/model"  # interpolations resolved
    world = 2
    actor = actor_view(wc.actor_rollout_ref, world)
    # 4 prompts x n=2 / 2 workers = 4 samples; rollout's global 6 / 2 workers = 3 per worker
    assert (actor.ppo_mini_batch_size, actor.rollout_n, actor.ppo_micro_batch_size_per_gpu) == (4, 1, 2)
    assert (actor.log_prob_micro_batch_size_per_gpu, actor.use_remove_padding) == (3, True)
    ref = ref_view(wc.actor_rollout_ref, world)
    assert (ref.log_prob_micro_batch_size_per_gpu, ref.use_remove_padding) == (2, True)  # the actor's per-rank
    assert ref_fsdp_config(wc.actor_rollout_ref) == FSDPConfig(param_offload=True, mixed_precision="fp32")
    critic = per_rank_batch_config(wc.critic, 2, world)
    assert (critic.ppo_mini_batch_size, critic.ppo_micro_batch_size_per_gpu, critic.ppo_micro_batch_size) == (4, 2, None)


def test_a_newly_registered_estimator_is_accepted():
    with pytest.raises(ConfigError) as info:
        compose_config(SMALL + ["algorithm.adv_estimator=my_baseline"])
    assert info.value.key == "algorithm.adv_estimator" and "grpo" in str(info.value)

    @core_algos.register_adv_est("my_baseline")
    def my_baseline(token_level_rewards, response_mask, **_):
        scores = token_level_rewards.sum(-1, keepdim=True)
        return (scores - scores.mean()) * response_mask, scores * response_mask

    try:
        cfg = compose_config(SMALL + ["algorithm.adv_estimator=my_baseline"])
        assert cfg.algorithm.adv_estimator == "my_baseline"
    finally:
        core_algos.ADV_ESTIMATORS.pop("my_baseline")
    with pytest.raises(ConfigError):
        compose_config(SMALL + ["algorithm.adv_estimator=my_baseline"])


def test_a_registered_estimator_gets_the_critic_and_group_checks_its_signature_asks_for():
    """An estimator taking `index` compares the samples of one prompt (needs n >= 2, like GRPO); one
    taking `values` needs the critic (like GAE). Read from the signature, not from a list of names."""
    @core_algos.register_adv_est("my_group_baseline")
    def my_group_baseline(token_level_rewards, response_mask, index):
        return token_level_rewards, token_level_rewards

    @core_algos.register_adv_est("my_value_baseline")
    def my_value_baseline(token_level_rewards, values, response_mask):
        return token_level_rewards - values, token_level_rewards

    try:
        assert core_algos.adv_estimator_inputs("my_group_baseline") == {"index"}
        assert core_algos.adv_estimator_inputs("my_value_baseline") == {"values"}
        assert {name: core_algos.adv_estimator_inputs(name) for name in ("gae", "grpo", "rloo", "reinforce_plus_plus",
                                                                         "reinforce_plus_plus_baseline")} == {
            "gae": {"values"}, "grpo": {"index"}, "rloo": {"index"}, "reinforce_plus_plus": set(),
            "reinforce_plus_plus_baseline": {"index"}}
        one_sample = [o for o in SMALL if not o.startswith("actor_rollout_ref.rollout.n=")] + ["actor_rollout_ref.rollout.n=1"]
        with pytest.raises(ConfigError) as info:
            compose_config(one_sample + ["algorithm.adv_estimator=my_group_baseline"])
        assert info.value.key == "actor_rollout_ref.rollout.n" and "n >= 2" in str(info.value)
        # the critic's sections are checked only for an estimator that takes values
        bad_critic = SMALL + ["critic.ppo_mini_batch_size=3"]
        with pytest.raises(ConfigError) as info:
            compose_config(bad_critic + ["algorithm.adv_estimator=my_value_baseline"])
        assert info.value.key.startswith("critic.")
        assert not uses_critic(compose_config(bad_critic + ["algorithm.adv_estimator=my_group_baseline"]))
        assert uses_critic(compose_config(SMALL + ["algorithm.adv_estimator=my_value_baseline"]))
    finally:
        core_algos.ADV_ESTIMATORS.pop("my_group_baseline")
        core_algos.ADV_ESTIMATORS.pop("my_value_baseline")


def test_policy_loss_and_kl_names_come_from_the_registries():
    with pytest.raises(ConfigError) as info:
        compose_config(SMALL + ["actor_rollout_ref.actor.policy_loss.loss_mode=gspo_like"])
    assert info.value.key == "actor_rollout_ref.actor.policy_loss.loss_mode" and "vanilla" in str(info.value)
    core_algos.register_policy_loss("gspo_like")(core_algos.compute_policy_loss)
    try:
        compose_config(SMALL + ["actor_rollout_ref.actor.policy_loss.loss_mode=gspo_like"])
    finally:
        core_algos.POLICY_LOSSES.pop("gspo_like")
    for name in ("k1", "k3+", "low_var_kl"):  # every KL_ESTIMATORS name, straight-through '+' included
        compose_config(SMALL + [f"algorithm.kl_penalty={name}", f"actor_rollout_ref.actor.kl_loss_type={name}"])
    err = pytest.raises(ConfigError, compose_config, SMALL + ["algorithm.kl_penalty=k4"]).value
    assert err.key == "algorithm.kl_penalty" and "low_var_kl" in str(err)


def test_the_actor_takes_its_policy_loss_from_the_registry(tok):
    from deepretrieval.models.tiny import make_prompt_batch, make_tiny_qwen2
    from deepretrieval.workers.actor import Actor
    from deepretrieval.workers.config import ActorConfig, RolloutConfig
    from deepretrieval.workers.rollout import HFRollout

    calls = []

    @core_algos.register_policy_loss("scaled_for_test")
    def scaled(old_log_prob, log_prob, advantages, response_mask, **kwargs):
        calls.append(kwargs["loss_agg_mode"])
        pg_loss, *rest = core_algos.compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, **kwargs)
        return (pg_loss * 0.0, *rest)  # no gradient: the weights must not move

    try:
        torch.manual_seed(0)
        model = make_tiny_qwen2(tok, hidden_size=32, seed=4)
        batch = HFRollout(model, tok, RolloutConfig(response_length=3)).generate_sequences(
            make_prompt_batch(tok, ["asthma", "stroke"], meta_info={"seed": 0}))
        actor = Actor(model, ActorConfig(ppo_mini_batch_size=2, policy_loss=PolicyLossConfig(loss_mode="scaled_for_test"),
                                         optim=OptimConfig(lr=1e-2, weight_decay=0.0)))
        batch.batch["old_log_probs"], _ = actor.compute_log_prob(batch)
        batch.batch["advantages"] = torch.ones_like(batch.batch["old_log_probs"])
        before = [p.detach().clone() for p in model.parameters()]
        metrics = actor.update_policy(batch)
    finally:
        core_algos.POLICY_LOSSES.pop("scaled_for_test")
    assert calls == ["token-mean"] and metrics["actor/pg_loss"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
