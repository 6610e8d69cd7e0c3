"""Loading and validating the PPO trainer configuration.

The defaults live in `config/ppo_trainer.yaml` (verl key names). `compose_config(overrides)` builds
the run configuration from `key=value` overrides the way `python -m deepretrieval.trainer.main_ppo`
does; `validate_config(cfg)` rejects, before anything expensive starts, every key that is not in the
defaults (with a "did you mean") and every setting that cannot work: batch arithmetic that does not
divide, unknown estimator names, a vLLM rollout without vLLM installed, and so on. Each problem is a
`ConfigError` that names the key and says why. `build_worker_config(cfg)` then turns the validated
config into the typed objects the workers receive (`deepretrieval.workers.config`).

Algorithm names are the registries' (`deepretrieval.algorithms.core_algos`): `algorithm.adv_estimator`
is any registered advantage estimator, `actor.policy_loss.loss_mode` any registered policy loss,
`algorithm.kl_penalty` / `actor.kl_loss_type` any KL estimator (optionally with the straight-through
`+`), so an estimator registered with `register_adv_est` is accepted without touching this file.

No key is silently ignored: the keys of every section are the keys of ppo_trainer.yaml (so a key
added there is accepted everywhere at once); the open `reward` section is checked key by key by
its owner (deepretrieval.rewards.literature.validate_reward_section: scoring keys, source
sections, engine constructor parameters); and the keys the YAML keeps only so that verl scripts
run (`COMPAT_KEYS`) are errors when set to a value asking for something the trainer does not do.

Batch-size arithmetic (verl semantics). With `W` data-parallel workers and `n` samples per prompt:
    train_batch_size * n            % W == 0        (every worker gets the same number of samples)
    ppo_mini_batch_size * n         % W == 0        (a mini-batch splits evenly over workers)
    (ppo_mini_batch_size * n / W)   % ppo_micro_batch_size_per_gpu == 0
    train_batch_size                % ppo_mini_batch_size == 0
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from deepretrieval.algorithms import core_algos
from deepretrieval.workers.config import ActorRolloutRefConfig, ConfigError, CriticConfig, WorkerConfig, from_dict

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "config"
CONFIG_NAME = "ppo_trainer"

# Sections that accept keys the defaults do not list (their contents are checked by their owner).
OPEN_SECTIONS = (
    "actor_rollout_ref.model.override_config",
    "critic.model.override_config",
    "reward",
)

LOGGERS = ("console", "jsonl", "wandb", "tensorboard")
ROLLOUT_NAMES = ("hf", "vllm")
HF_ROLLOUT_CACHES = ("dynamic", "static")
HF_ROLLOUT_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
STRATEGIES = ("fsdp", "fsdp2")


# Keys kept for verl compatibility that nothing reads: key -> (values that mean what the trainer
# does anyway, what to say otherwise).
COMPAT_KEYS: Dict[str, tuple] = {
    "actor_rollout_ref.hybrid_engine": ((True,), "actor, rollout and reference always share one process per device"),
    "reward_model.reward_manager": (("naive",), "rewards come from the search reward manager (the `reward` section); "
                                    "set custom_reward_function.path for a reward of your own"),
    "actor_rollout_ref.actor.checkpoint.contents": (
        (["model", "optimizer", "extra"], ["model", "optimizer", "extra", "hf_model"]),
        "checkpoints always hold model, optimizer and extra state (trainer.save_hf_model adds the HF folder)"),
    "critic.checkpoint.contents": (
        (["model", "optimizer", "extra"], ["model", "optimizer", "extra", "hf_model"]),
        "checkpoints always hold model, optimizer and extra state"),
}


# --------------------------------------------------------------------------------------------
# loading


def default_config() -> DictConfig:
    """The defaults of `ppo_trainer.yaml` without Hydra's own sections, unresolved."""
    cfg = OmegaConf.load(CONFIG_DIR / f"{CONFIG_NAME}.yaml")
    for key in ("defaults", "hydra"):
        if key in cfg:
            cfg.pop(key)
    return cfg


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0].strip()
    return key.lstrip("~+")


def _in_open_section(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in OPEN_SECTIONS)


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return False
        node = node._get_node(part)  # no interpolation resolution while walking
    return True


def _all_keys(cfg: Any, prefix: str = "") -> List[str]:
    keys: List[str] = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            full = f"{prefix}.{k}" if prefix else str(k)
            keys.append(full)
            keys.extend(_all_keys(cfg._get_node(k), full))
    return keys


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_override_keys(overrides: Sequence[str], defaults: Optional[DictConfig] = None) -> List[str]:
    """Check the keys of `key=value` overrides against the defaults; returns the overrides ready for
    Hydra (keys inside open sections get the `+` Hydra needs to add them). Hydra's own keys
    (`hydra.*`) pass through. Raises ConfigError for an unknown key."""
    defaults = default_config() if defaults is None else defaults
    known = _all_keys(defaults)
    ready: List[str] = []
    for ov in overrides:
        if "=" not in ov and not ov.startswith("~"):
            raise ConfigError(ov, "expected key=value")
        key = _override_key(ov)
        if key.startswith("hydra.") or key == "hydra":
            ready.append(ov)
            continue
        if _has_key(defaults, key):
            ready.append(ov.lstrip("+") if ov.startswith("+") and not ov.startswith("++") else ov)
            continue
        if _in_open_section(key):
            ready.append(ov if ov.startswith("+") else "++" + ov)
            continue
        raise ConfigError(key, "unknown key (not in ppo_trainer.yaml)" + _suggest(key, known))
    return ready


def compose_config(overrides: Sequence[str] = (), validate: bool = True) -> DictConfig:
    """Build the run configuration from the defaults and `key=value` overrides (Hydra syntax)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    ready = check_override_keys(list(overrides))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name=CONFIG_NAME, overrides=ready)
    if validate:
        validate_config(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# validation


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def resolve_device(cfg: DictConfig) -> str:
    """`trainer.device` made concrete: "cuda" or "cpu"."""
    device = str(_get(cfg, "trainer.device", "auto"))
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def world_size(cfg: DictConfig) -> int:
    return int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)


def _check_unknown(cfg: DictConfig, defaults: DictConfig, prefix: str = "") -> None:
    for key in cfg.keys():
        full = f"{prefix}.{key}" if prefix else str(key)
        if _in_open_section(full):
            continue
        if key not in defaults.keys():
            raise ConfigError(full, "unknown key (not in ppo_trainer.yaml)" + _suggest(full, _all_keys(defaults)))
        sub, dsub = cfg._get_node(key), defaults._get_node(key)
        if isinstance(sub, DictConfig) and isinstance(dsub, DictConfig) and not sub._is_missing() and not sub._is_none():
            _check_unknown(sub, dsub, full)


def _positive_int(cfg: DictConfig, key: str, allow_none: bool = False) -> Optional[int]:
    value = _get(cfg, key)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, f"must be a positive integer, got {value!r}")
    return value


def _check_lora(cfg: DictConfig, model: str) -> None:
    """LoRA keys of a model section: lora_rank an integer >= 0 (0 = full fine-tuning), and with
    lora_rank > 0 a positive lora_alpha and non-empty target_modules (all-linear, a comma-separated
    string or a list of module names)."""
    rank = _get(cfg, f"{model}.lora_rank")
    if rank is None:
        rank = 0
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"{model}.lora_rank", f"must be an integer >= 0 (0 = full fine-tuning), got {rank!r}")
    if rank == 0:
        return
    alpha = _get(cfg, f"{model}.lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"{model}.lora_alpha", f"must be a positive number with lora_rank > 0, got {alpha!r}")
    targets = _get(cfg, f"{model}.target_modules")
    if isinstance(targets, str):
        names = [t.strip() for t in targets.split(",") if t.strip()]
    elif isinstance(targets, (list, ListConfig)):
        names = [str(t).strip() for t in targets if str(t).strip()]
    else:
        names = []
    if not names:
        raise ConfigError(f"{model}.target_modules", f"must name the modules to adapt (e.g. all-linear or "
                          f"q_proj,v_proj) with lora_rank > 0, got {targets!r}")
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"{model}.lora_rank", "LoRA needs the peft package (pip install peft)")


def kl_penalty_names() -> List[str]:
    """The KL estimator names `core_algos.kl_penalty` accepts: each registered one, and each with the
    straight-through `+` suffix."""
    names = list(core_algos.KL_ESTIMATORS)
    return names + [n + "+" for n in names]


def _one_of(cfg: DictConfig, key: str, allowed: Sequence[str]) -> str:
    value = _get(cfg, key)
    if value not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(allowed)}; got {value!r}")
    return value


def micro_batch_per_gpu(cfg: DictConfig, section: str, name: str, world: int, fallback: Optional[int] = None) -> int:
    """verl's rule: exactly one of `<name>` (across all devices, deprecated) and `<name>_per_gpu`."""
    global_key, per_gpu_key = f"{section}.{name}", f"{section}.{name}_per_gpu"
    glob, per = _get(cfg, global_key), _get(cfg, per_gpu_key)
    if glob is not None and per is not None:
        raise ConfigError(global_key, f"set only one of '{global_key}' and '{per_gpu_key}' ('{per_gpu_key}' is preferred)")
    if per is not None:
        return _positive_int(cfg, per_gpu_key)  # type: ignore[return-value]
    if glob is not None:
        glob = _positive_int(cfg, global_key)
        if glob % world:
            raise ConfigError(global_key, f"{glob} is not divisible by the {world} data-parallel workers")
        return glob // world
    if fallback is not None:
        return fallback
    raise ConfigError(per_gpu_key, "must be set (samples per forward/backward on each device)")


def uses_critic(cfg: DictConfig) -> bool:
    """Whether the estimator takes values (GAE, or any registered estimator that does)."""
    return "values" in core_algos.adv_estimator_inputs(_get(cfg, "algorithm.adv_estimator"))


def uses_reference(cfg: DictConfig) -> bool:
    return bool(_get(cfg, "algorithm.use_kl_in_reward")) or bool(_get(cfg, "actor_rollout_ref.actor.use_kl_loss"))


def _check_token_budget(cfg: DictConfig, key: str) -> int:
    """A dynamic-batch token budget: a positive integer that holds at least one whole sample."""
    budget = _positive_int(cfg, key)
    longest = int(_get(cfg, "data.max_prompt_length")) + int(_get(cfg, "data.max_response_length"))
    if budget < longest:  # type: ignore[operator]
        raise ConfigError(key, f"{budget} tokens cannot hold one sample of max_prompt_length + max_response_length "
                          f"= {longest} tokens")
    return budget  # type: ignore[return-value]


def _check_old_log_prob_shortcut(cfg: DictConfig, actor: str) -> None:
    """`actor.recompute_old_log_prob=false` is exact only when the batch's one optimiser step starts
    from the policy that sampled it, and nothing else reads the old log-probs."""
    key = f"{actor}.recompute_old_log_prob"
    if _get(cfg, key) is not False:
        return
    train_batch = _get(cfg, "data.train_batch_size")
    why = []
    if _get(cfg, f"{actor}.ppo_epochs") != 1:
        why.append(f"ppo_epochs={_get(cfg, f'{actor}.ppo_epochs')} (needs 1)")
    if _get(cfg, f"{actor}.ppo_mini_batch_size") != train_batch:
        why.append(f"ppo_mini_batch_size={_get(cfg, f'{actor}.ppo_mini_batch_size')} < data.train_batch_size={train_batch} "
                   "(later mini-batches are off-policy)")
    if _get(cfg, "algorithm.use_kl_in_reward"):
        why.append("algorithm.use_kl_in_reward reads the old log-probs")
    if why:
        raise ConfigError(key, "false needs one optimiser step per batch from the sampling policy: " + "; ".join(why))


def _check_ppo_batches(cfg: DictConfig, section: str, world: int, n: int, train_batch: int) -> Optional[int]:
    """Mini-/micro-batch arithmetic of `section`; returns the per-device micro-batch (None with
    use_dynamic_bsz and no fixed micro-batch set: micro-batches are then formed by token budget)."""
    mini = _positive_int(cfg, f"{section}.ppo_mini_batch_size")
    if mini > train_batch:
        raise ConfigError(f"{section}.ppo_mini_batch_size",
                          f"{mini} is larger than data.train_batch_size={train_batch}")
    if train_batch % mini:
        raise ConfigError(f"{section}.ppo_mini_batch_size",
                          f"data.train_batch_size={train_batch} is not a multiple of {mini}")
    if (mini * n) % world:
        raise ConfigError(f"{section}.ppo_mini_batch_size",
                          f"{mini} prompts x rollout.n={n} = {mini * n} samples do not split over {world} workers")
    if _get(cfg, f"{section}.use_dynamic_bsz"):
        _check_token_budget(cfg, f"{section}.ppo_max_token_len_per_gpu")
        if _get(cfg, f"{section}.ppo_micro_batch_size_per_gpu") is None and _get(cfg, f"{section}.ppo_micro_batch_size") is None:
            return None
    micro = micro_batch_per_gpu(cfg, section, "ppo_micro_batch_size", world)
    per_rank = mini * n // world
    if per_rank % micro:
        raise ConfigError(f"{section}.ppo_micro_batch_size_per_gpu",
                          f"a mini-batch gives each of the {world} workers {per_rank} samples, "
                          f"not a multiple of the micro-batch {micro}")
    return micro


def _check_compat_keys(cfg: DictConfig) -> None:
    for key, (accepted, why) in COMPAT_KEYS.items():
        value = _get(cfg, key)
        if isinstance(value, ListConfig):
            value = sorted(str(v) for v in value)
        if value not in [sorted(a) if isinstance(a, list) else a for a in accepted]:
            shown = " or ".join(repr(a) for a in accepted)
            raise ConfigError(key, f"is accepted for verl compatibility with the value {shown} only: {why}; got {value!r}")
    tok_path = _get(cfg, "critic.model.tokenizer_path")
    if tok_path is not None and tok_path != _get(cfg, "actor_rollout_ref.model.path"):
        raise ConfigError("critic.model.tokenizer_path", "the critic reads the actor's tokens: only null or the value of "
                          f"actor_rollout_ref.model.path is accepted (set data.tokenizer for another tokenizer); got {tok_path!r}")
    if _get(cfg, "custom_reward_function.path") is None and _get(cfg, "custom_reward_function.name") != "compute_score":
        raise ConfigError("custom_reward_function.name", "has no effect without custom_reward_function.path "
                          "(the python file that defines it)")
    critic_keep = _get(cfg, "trainer.max_critic_ckpt_to_keep")
    if critic_keep is not None and critic_keep != _get(cfg, "trainer.max_actor_ckpt_to_keep"):
        raise ConfigError("trainer.max_critic_ckpt_to_keep", "checkpoints hold both roles: set "
                          f"trainer.max_actor_ckpt_to_keep (this key may only repeat its value); got {critic_keep!r}")


def _check_reward_section(cfg: DictConfig) -> None:
    """The open `reward` section, key by key (its owner's validation), before anything starts."""
    from deepretrieval.rewards.literature import RewardConfig, RewardConfigError

    section = cfg.get("reward")
    if section is None:
        return
    try:
        RewardConfig.from_config(to_plain(section))
    except RewardConfigError as exc:
        raise ConfigError(exc.key, exc.reason) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError("reward", str(exc)) from None


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first problem found; returns None when the config can run."""
    _check_unknown(cfg, default_config())
    _check_reward_section(cfg)

    for key in ("data.train_files", "actor_rollout_ref.model.path"):
        if OmegaConf.is_missing(cfg, key) or _get(cfg, key) in (None, "", []):
            raise ConfigError(key, "is required")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # interpolation errors name the key in their message
        raise ConfigError(getattr(exc, "full_key", "?") or "?", f"cannot be resolved: {exc}") from None
    _check_compat_keys(cfg)

    device = _one_of(cfg, "trainer.device", ("auto", "cuda", "cpu"))
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", "cuda requested but torch sees no CUDA device")
    world_n = _positive_int(cfg, "trainer.n_gpus_per_node")
    nnodes = _positive_int(cfg, "trainer.nnodes")
    world = world_n * nnodes
    use_ray = _get(cfg, "trainer.use_ray")
    if use_ray not in ("auto", True, False):
        raise ConfigError("trainer.use_ray", f"must be auto, true or false; got {use_ray!r}")
    if use_ray is False and world > 1:
        raise ConfigError("trainer.use_ray", f"false (in-process) runs one worker, but {world} devices are requested "
                          "(set trainer.n_gpus_per_node=1 trainer.nnodes=1)")
    if world > 1 and importlib.util.find_spec("ray") is None:
        raise ConfigError("trainer.n_gpus_per_node", f"{world} workers need Ray, which is not installed "
                          "(pip install 'ray[default]', or run in-process with n_gpus_per_node=1)")

    train_batch = _positive_int(cfg, "data.train_batch_size")
    _positive_int(cfg, "data.val_batch_size", allow_none=True)
    _positive_int(cfg, "data.max_prompt_length")
    _positive_int(cfg, "data.max_response_length")
    _one_of(cfg, "data.truncation", ("error", "left", "right"))
    if _get(cfg, "actor_rollout_ref.rollout.prompt_length") != _get(cfg, "data.max_prompt_length"):
        raise ConfigError("actor_rollout_ref.rollout.prompt_length", "must equal data.max_prompt_length")
    if _get(cfg, "actor_rollout_ref.rollout.response_length") != _get(cfg, "data.max_response_length"):
        raise ConfigError("actor_rollout_ref.rollout.response_length", "must equal data.max_response_length")

    rollout = "actor_rollout_ref.rollout"
    name = _one_of(cfg, f"{rollout}.name", ROLLOUT_NAMES)
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"{rollout}.name", "vllm rollout requested but the vllm package is not installed "
                              "(pip install -r requirements-gpu.txt, or use rollout.name=hf)")
        tp = _positive_int(cfg, f"{rollout}.tensor_model_parallel_size")
        if world % tp:
            raise ConfigError(f"{rollout}.tensor_model_parallel_size", f"{tp} does not divide the {world} devices")
    if name == "hf":  # checked here so a bad value fails at start, not when the workers build the rollout
        cache = _one_of(cfg, f"{rollout}.hf.cache", HF_ROLLOUT_CACHES)
        compact = _get(cfg, f"{rollout}.hf.compact_every")
        if isinstance(compact, bool) or not isinstance(compact, int) or compact < 0:
            raise ConfigError(f"{rollout}.hf.compact_every", f"must be an integer >= 0, got {compact!r}")
        compile_mode = _get(cfg, f"{rollout}.hf.compile")
        if compile_mode not in (None, False, True) and compile_mode not in HF_ROLLOUT_COMPILE_MODES:
            raise ConfigError(f"{rollout}.hf.compile", f"must be true, false or one of {', '.join(HF_ROLLOUT_COMPILE_MODES)}")
        if compile_mode not in (None, False) and cache != "static":
            raise ConfigError(f"{rollout}.hf.compile", "needs rollout.hf.cache=static (a dynamic cache changes shape every step)")
    n = _positive_int(cfg, f"{rollout}.n")
    _positive_int(cfg, f"{rollout}.val_kwargs.n")
    if n > 1 and not _get(cfg, f"{rollout}.do_sample"):
        raise ConfigError(f"{rollout}.n", f"{n} samples per prompt need do_sample=true (greedy samples are identical)")
    if (train_batch * n) % world:
        raise ConfigError("data.train_batch_size", f"{train_batch} prompts x rollout.n={n} = {train_batch * n} samples "
                          f"do not split evenly over {world} workers")

    actor = "actor_rollout_ref.actor"
    _one_of(cfg, f"{actor}.strategy", STRATEGIES)
    _one_of(cfg, "critic.strategy", STRATEGIES)
    actor_micro = _check_ppo_batches(cfg, actor, world, n, train_batch)
    for section in (rollout, "actor_rollout_ref.ref"):
        dynamic = bool(_get(cfg, f"{section}.log_prob_use_dynamic_bsz"))
        if dynamic:
            _check_token_budget(cfg, f"{section}.log_prob_max_token_len_per_gpu")
        else:  # fixed micro-batches: a size of its own, else the actor's (None when the actor's are dynamic)
            micro_batch_per_gpu(cfg, section, "log_prob_micro_batch_size", world, fallback=actor_micro)
    _positive_int(cfg, f"{actor}.ppo_epochs")
    _check_old_log_prob_shortcut(cfg, actor)
    clip_c = _get(cfg, f"{actor}.clip_ratio_c")
    if clip_c is not None and (isinstance(clip_c, bool) or not isinstance(clip_c, (int, float)) or clip_c <= 1.0):
        raise ConfigError(f"{actor}.clip_ratio_c", f"must be a number > 1 (dual clip) or null (no dual clip), got {clip_c!r}")
    _one_of(cfg, f"{actor}.loss_agg_mode", core_algos.LOSS_AGG_MODES)
    _one_of(cfg, f"{actor}.kl_loss_type", kl_penalty_names())
    _one_of(cfg, f"{actor}.policy_loss.loss_mode", list(core_algos.POLICY_LOSSES))
    for fsdp_key in (f"{actor}.fsdp_config", "critic.model.fsdp_config"):
        _one_of(cfg, f"{fsdp_key}.mixed_precision", ("auto", "bf16", "fp32"))
    for section in (actor, "critic"):
        _one_of(cfg, f"{section}.optim.warmup_style", ("constant", "cosine"))
    _check_lora(cfg, "actor_rollout_ref.model")
    if _get(cfg, "reward_model.enable"):
        raise ConfigError("reward_model.enable", "model-based rewards are not supported; rewards come from the `reward` section")
    if _get(cfg, "trainer.default_hdfs_dir") is not None:
        raise ConfigError("trainer.default_hdfs_dir", "HDFS is not supported; use trainer.default_local_dir")

    algo = "algorithm"
    _one_of(cfg, f"{algo}.adv_estimator", list(core_algos.ADV_ESTIMATORS))
    _one_of(cfg, f"{algo}.kl_penalty", kl_penalty_names())
    _one_of(cfg, f"{algo}.kl_ctrl.type", ("fixed", "adaptive"))
    if uses_critic(cfg):
        critic_micro = _check_ppo_batches(cfg, "critic", world, n, train_batch)
        if _get(cfg, "critic.use_dynamic_bsz"):
            _check_token_budget(cfg, "critic.forward_max_token_len_per_gpu")
        else:
            micro_batch_per_gpu(cfg, "critic", "forward_micro_batch_size", world, fallback=critic_micro)
        _one_of(cfg, "critic.loss_agg_mode", core_algos.LOSS_AGG_MODES)
        if not _get(cfg, "critic.model.path"):
            raise ConfigError("critic.model.path",
                              f"is required with adv_estimator={_get(cfg, f'{algo}.adv_estimator')} (it takes values)")
    elif n < 2 and "index" in core_algos.adv_estimator_inputs(_get(cfg, f"{algo}.adv_estimator")):
        raise ConfigError(f"{rollout}.n", f"{_get(cfg, f'{algo}.adv_estimator')} compares samples of one prompt; needs n >= 2")
    if _get(cfg, f"{algo}.use_kl_in_reward") and _get(cfg, f"{actor}.use_kl_loss"):
        logger.warning("both algorithm.use_kl_in_reward and actor.use_kl_loss are on: the KL is counted twice")

    trainer = "trainer"
    _positive_int(cfg, f"{trainer}.total_epochs")
    _positive_int(cfg, f"{trainer}.total_training_steps", allow_none=True)
    for key in ("save_freq", "test_freq"):
        value = _get(cfg, f"{trainer}.{key}")
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ConfigError(f"{trainer}.{key}", f"must be an integer >= -1, got {value!r}")
    loggers = _get(cfg, f"{trainer}.logger")
    if isinstance(loggers, str):
        loggers = [loggers]
    if not isinstance(loggers, (list, ListConfig)):
        raise ConfigError(f"{trainer}.logger", f"must be a list, e.g. [console,jsonl]; got {loggers!r}")
    for item in loggers:
        if item not in LOGGERS:
            raise ConfigError(f"{trainer}.logger", f"unknown logger {item!r}; known: {', '.join(LOGGERS)}")
    keep = _get(cfg, f"{trainer}.max_actor_ckpt_to_keep")
    if keep is not None:
        _positive_int(cfg, f"{trainer}.max_actor_ckpt_to_keep")
    mode = _get(cfg, f"{trainer}.resume_mode")
    if mode not in ("auto", "disable", "resume_path"):
        if not isinstance(mode, str) or not os.path.isdir(mode):
            raise ConfigError(f"{trainer}.resume_mode", f"must be auto, disable, resume_path or an existing checkpoint "
                              f"folder; {mode!r} is none of these")
    if mode == "resume_path" and not _get(cfg, f"{trainer}.resume_from_path"):
        raise ConfigError(f"{trainer}.resume_from_path", "required with resume_mode=resume_path")
    timeout = _get(cfg, f"{trainer}.ray_init.timeout_s")
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"{trainer}.ray_init.timeout_s", f"must be a positive number of seconds, got {timeout!r}")
    _check_fault_keys(cfg)
    _check_search_service(cfg)
    _check_overlong_buffer(cfg)
    build_worker_config(cfg)  # the workers' typed sections build (ConfigError naming the key otherwise)


def _check_search_service(cfg: DictConfig) -> None:
    """reward_model.search_service: a boolean switch, replicas >= 1, a positive timeout, CPUs >= 0,
    known engine kinds; enabled, it needs Ray."""
    from deepretrieval.search.base import ENGINES

    key = "reward_model.search_service"
    enable = _get(cfg, f"{key}.enable")
    if not isinstance(enable, bool):
        raise ConfigError(f"{key}.enable", f"must be true or false, got {enable!r}")
    _positive_int(cfg, f"{key}.replicas_per_node")
    for name, low in (("timeout_s", "a positive"), ("num_cpus", "a non-negative")):
        value = _get(cfg, f"{key}.{name}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (name == "timeout_s" and value == 0):
            raise ConfigError(f"{key}.{name}", f"must be {low} number, got {value!r}")
    engines = _get(cfg, f"{key}.engines")
    engines = [engines] if isinstance(engines, str) else engines
    if not isinstance(engines, (list, ListConfig)) or any(e not in ENGINES for e in engines):
        raise ConfigError(f"{key}.engines", f"must list engine kinds among {', '.join(sorted(ENGINES))}; got {engines!r}")
    if enable and importlib.util.find_spec("ray") is None:
        raise ConfigError(f"{key}.enable", "the search service runs on Ray, which is not installed (pip install 'ray[default]')")


def _check_overlong_buffer(cfg: DictConfig) -> None:
    """reward_model.overlong_buffer: a boolean switch; enabled, 1 <= len < data.max_response_length
    and a number penalty_factor >= 0."""
    key = "reward_model.overlong_buffer"
    enable = _get(cfg, f"{key}.enable")
    if not isinstance(enable, bool):
        raise ConfigError(f"{key}.enable", f"must be true or false, got {enable!r}")
    if not enable:
        return
    length = _positive_int(cfg, f"{key}.len")
    limit = _get(cfg, "data.max_response_length")
    if length >= limit:
        raise ConfigError(f"{key}.len", f"must be below data.max_response_length ({limit}), got {length}")
    factor = _get(cfg, f"{key}.penalty_factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
        raise ConfigError(f"{key}.penalty_factor", f"must be a number >= 0, got {factor!r}")


def _check_fault_keys(cfg: DictConfig) -> None:
    """trainer.max_restarts (integer >= 0) and trainer.max_consecutive_skipped_steps (>= 1 or null)."""
    restarts = _get(cfg, "trainer.max_restarts")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise ConfigError("trainer.max_restarts", f"must be an integer >= 0, got {restarts!r}")
    _positive_int(cfg, "trainer.max_consecutive_skipped_steps", allow_none=True)


# --------------------------------------------------------------------------------------------
# per-worker views


def build_worker_config(cfg: DictConfig, total_training_steps: Optional[int] = None) -> WorkerConfig:
    """The typed configuration the workers receive, from a validated run config. With
    `total_training_steps` both roles' `optim.total_training_steps` are set to it (the trainer knows
    the number of steps only once the data is loaded). The actor_rollout_ref and critic sections are
    read whole (unknown keys were rejected by validate_config; a ConfigError here names the key)."""
    arr = to_plain(cfg.actor_rollout_ref)
    critic = to_plain(cfg.critic)
    if total_training_steps is not None:
        for section in (arr["actor"], critic):
            section["optim"]["total_training_steps"] = int(total_training_steps)
    return WorkerConfig(
        actor_rollout_ref=from_dict(ActorRolloutRefConfig, arr, "actor_rollout_ref"),
        critic=from_dict(CriticConfig, critic, "critic"),
        seed=int(cfg.trainer.seed), deterministic=bool(cfg.trainer.deterministic), tokenizer=cfg.data.tokenizer)


def to_plain(cfg: Any) -> Any:
    """A resolved plain-python copy of a config node (dicts/lists), for pickling to workers."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return copy.deepcopy(cfg)
