"""Typed configuration of the workers: one frozen dataclass per section of `ppo_trainer.yaml` they read.

The trainer composes and validates the Hydra config (`deepretrieval.trainer.config`), then builds
these objects once (`from_dict`) and hands them to the worker processes; the roles (`Actor`,
`Critic`, `Reference`, the rollouts) read attributes, never `cfg.get(key, default)`.

Defaults: each field's default is the YAML's (resolved through its interpolations, `???` read as
None). Both are kept because each serves a reader the other cannot: the YAML is what Hydra composes,
`--cfg` prints and docs/configuration.md documents; the dataclass defaults let the roles be built
without a composed config (tests, benchmarks, the evaluation runner's rollout). A test
(tests/test_worker_config.py) checks that the two agree key for key, so they cannot drift apart.

Fields marked `derived` are not YAML keys: the worker fills them from neighbouring sections
(`per_rank_batch_config`, `ActorRolloutRefConfig.actor_view` / `ref_view`), as verl's workers do.

`from_dict` rejects a key that is not a field (with a "did you mean"), names the dotted key at
fault, turns YAML lists into tuples where a field is a tuple, and rejects a scalar of the wrong type
(`lr: "1e-5"`, YAML 1.1's reading of an exponent without a dot, or `ppo_epochs: 1.5`) before a worker
starts, instead of a TypeError deep in a worker; an int is accepted for a float.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Dict, Mapping, Optional, Tuple, TypeVar, Union

T = TypeVar("T")

DERIVED = {"derived": True}  # field metadata: filled by the worker, not a YAML key


class ConfigError(ValueError):
    """A configuration problem; `key` is the dotted key at fault."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"config key '{key}': {reason}")


# --------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class OptimConfig:
    """`<role>.optim`: AdamW and the warm-up + constant/cosine LR schedule (workers/optim.py)."""

    lr: float = 1.0e-6
    lr_warmup_steps: int = -1
    lr_warmup_steps_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    warmup_style: str = "constant"
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    total_training_steps: int = -1


@dataclass(frozen=True)
class FSDPConfig:
    """`<role>.fsdp_config`: FSDP2 sharding, offload and mixed precision."""

    param_offload: bool = False
    optimizer_offload: bool = False
    reshard_after_forward: bool = True
    mixed_precision: str = "auto"
    force: bool = False


@dataclass(frozen=True)
class RefFSDPConfig:
    """`actor_rollout_ref.ref.fsdp_config`: the reference's own offload (the rest is the actor's)."""

    param_offload: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    """`<role>.checkpoint` (verl compatibility: everything is always saved)."""

    contents: Tuple[str, ...] = ("model", "optimizer", "extra")


@dataclass(frozen=True)
class PolicyLossConfig:
    """`actor_rollout_ref.actor.policy_loss`: `loss_mode` names a registered policy loss
    (`core_algos.register_policy_loss`)."""

    loss_mode: str = "vanilla"


@dataclass(frozen=True)
class HFModelConfig:
    """The keys both model sections have: the HF folder, its loading and how it runs."""

    path: Optional[str] = None
    external_lib: Optional[str] = None
    override_config: Dict[str, Any] = field(default_factory=dict)
    enable_gradient_checkpointing: bool = False
    use_remove_padding: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ModelConfig(HFModelConfig):
    """`actor_rollout_ref.model`: the policy's HF model, gradient checkpointing, packing and LoRA."""

    lora_rank: int = 0
    lora_alpha: float = 16
    target_modules: Union[str, Tuple[str, ...]] = "all-linear"


@dataclass(frozen=True)
class ActorConfig:
    """`actor_rollout_ref.actor`. In a worker `ppo_mini_batch_size` is samples per worker
    (`per_rank_batch_config`); the derived fields come from the model and rollout sections."""

    strategy: str = "fsdp2"
    ppo_mini_batch_size: int = 16
    ppo_micro_batch_size: Optional[int] = None
    ppo_micro_batch_size_per_gpu: Optional[int] = None
    use_dynamic_bsz: bool = False
    ppo_max_token_len_per_gpu: int = 16384
    ppo_epochs: int = 1
    recompute_old_log_prob: bool = True
    shuffle: bool = False
    clip_ratio: float = 0.2
    clip_ratio_low: Optional[float] = None
    clip_ratio_high: Optional[float] = None
    clip_ratio_c: Optional[float] = 3.0
    loss_agg_mode: str = "token-mean"
    entropy_coeff: float = 0.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    grad_clip: Optional[float] = 1.0
    logprob_chunk_size: int = 0
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp_config: FSDPConfig = field(default_factory=FSDPConfig)
    # derived: samples per prompt in `ppo_mini_batch_size` (1 once per-rank), model.use_remove_padding,
    # and the old-log-prob micro-batching of the rollout section
    rollout_n: int = field(default=1, metadata=DERIVED)
    use_remove_padding: bool = field(default=False, metadata=DERIVED)
    log_prob_micro_batch_size_per_gpu: Optional[int] = field(default=None, metadata=DERIVED)
    log_prob_use_dynamic_bsz: bool = field(default=False, metadata=DERIVED)
    log_prob_max_token_len_per_gpu: Optional[int] = field(default=None, metadata=DERIVED)


@dataclass(frozen=True)
class RefConfig:
    """`actor_rollout_ref.ref`: micro-batching of the reference log-probs."""

    log_prob_micro_batch_size: Optional[int] = None
    log_prob_micro_batch_size_per_gpu: Optional[int] = None
    log_prob_use_dynamic_bsz: bool = False
    log_prob_max_token_len_per_gpu: int = 16384
    fsdp_config: RefFSDPConfig = field(default_factory=RefFSDPConfig)
    # derived: the actor's logprob_chunk_size and model.use_remove_padding
    logprob_chunk_size: int = field(default=0, metadata=DERIVED)
    use_remove_padding: bool = field(default=False, metadata=DERIVED)


@dataclass(frozen=True)
class HFRolloutConfig:
    """`actor_rollout_ref.rollout.hf`: the transformers rollout's fast paths."""

    shared_prefill: bool = True
    compact_every: int = 4
    cache: str = "dynamic"
    compile: Union[bool, str] = False


@dataclass(frozen=True)
class SamplingConfig:
    """`actor_rollout_ref.rollout.val_kwargs`: sampling during validation."""

    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    n: int = 1
    do_sample: bool = False


@dataclass(frozen=True)
class RolloutConfig:
    """`actor_rollout_ref.rollout`: engine, sampling and lengths."""

    name: str = "hf"
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    do_sample: bool = True
    n: int = 1
    prompt_length: int = 512
    response_length: int = 512
    micro_batch_size: Optional[int] = None
    log_prob_micro_batch_size: Optional[int] = None
    log_prob_micro_batch_size_per_gpu: Optional[int] = None
    log_prob_use_dynamic_bsz: bool = False
    log_prob_max_token_len_per_gpu: int = 16384
    gpu_memory_utilization: float = 0.5
    tensor_model_parallel_size: int = 1
    enforce_eager: bool = True
    free_cache_engine: bool = True
    max_num_batched_tokens: int = 8192
    dtype: str = "auto"
    kv_cache_memory_gb: Optional[float] = None
    hf: HFRolloutConfig = field(default_factory=HFRolloutConfig)
    val_kwargs: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass(frozen=True)
class ActorRolloutRefConfig:
    """`actor_rollout_ref`: what an `ActorRolloutRefWorker` holds."""

    hybrid_engine: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass(frozen=True)
class CriticModelConfig(HFModelConfig):
    """`critic.model`: the value model's backbone."""

    tokenizer_path: Optional[str] = None
    fsdp_config: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass(frozen=True)
class CriticConfig:
    """`critic`. In a worker `ppo_mini_batch_size` is samples per worker (`per_rank_batch_config`)."""

    strategy: str = "fsdp2"
    model: CriticModelConfig = field(default_factory=CriticModelConfig)
    ppo_mini_batch_size: int = 16
    ppo_micro_batch_size: Optional[int] = None
    ppo_micro_batch_size_per_gpu: Optional[int] = None
    forward_micro_batch_size: Optional[int] = None
    forward_micro_batch_size_per_gpu: Optional[int] = None
    use_dynamic_bsz: bool = False
    ppo_max_token_len_per_gpu: int = 32768
    forward_max_token_len_per_gpu: int = 32768
    ppo_epochs: int = 1
    shuffle: bool = False
    cliprange_value: Optional[float] = 0.5
    loss_agg_mode: str = "token-mean"
    grad_clip: Optional[float] = 1.0
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.0e-5))
    rollout_n: int = field(default=1, metadata=DERIVED)  # samples per prompt in ppo_mini_batch_size


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process reads: the two role sections and, from `trainer` / `data`, the
    seed, torch determinism and the tokenizer path (None: the model's)."""

    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    seed: int = 1
    deterministic: bool = False
    tokenizer: Optional[str] = None


# --------------------------------------------------------------------------------------------
# building


def _dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def yaml_fields(cls: type) -> Tuple[dataclasses.Field, ...]:
    """The fields of a section dataclass that are YAML keys (not `derived`)."""
    return tuple(f for f in fields(cls) if not f.metadata.get("derived"))


def _is_tuple_type(tp: Any) -> bool:
    """True for Tuple[...] and for a Union whose only non-None, non-str member is a Tuple."""
    if typing.get_origin(tp) is tuple:
        return True
    if typing.get_origin(tp) is Union:
        return any(_is_tuple_type(a) for a in typing.get_args(tp))
    return False


_SCALARS = (bool, int, float, str)


def _scalar_ok(tp: Any, value: Any) -> bool:
    """Whether `value` fits the field type `tp`: bool, int (not a bool), float (an int too), str, None
    for an Optional, any member of a Union; other types (tuples, mappings, Any) are not checked here."""
    if tp is Any:
        return True
    if typing.get_origin(tp) is Union:
        members = typing.get_args(tp)
        if not all(m is type(None) or m in _SCALARS for m in members):
            return True  # a Union with a container member (Union[str, Tuple[str, ...]]): not checked
        return any(_scalar_ok(m, value) for m in members)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Union:
        return " or ".join("null" if m is type(None) else _type_name(m) for m in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build the section dataclass `cls` from a plain mapping (a resolved config section); keys not
    given take the field's default; an existing `cls` instance is returned as is. `prefix` is the
    dotted key of `data` in the whole config, for error messages. Raises ConfigError for a key that
    is not a field, a value that is not a section where one is expected, or a scalar of another type."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(prefix or cls.__name__, f"must be a section (key: value mapping), got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs: Dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f"; did you mean '{_dotted(prefix, close[0])}'?" if close else ""
            raise ConfigError(_dotted(prefix, key), f"unknown key of {cls.__name__}{hint}")
        tp = hints[key]
        if is_dataclass(tp):
            value = from_dict(tp, value, _dotted(prefix, key))
        elif _is_tuple_type(tp) and isinstance(value, (list, tuple)):
            value = tuple(value)
        elif not _scalar_ok(tp, value):
            raise ConfigError(_dotted(prefix, key), f"must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        kwargs[key] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# per-worker views


def per_rank_batch_config(section: T, rollout_n: int, world: int) -> T:
    """The actor or critic section with verl's per-rank normalisation applied: `ppo_mini_batch_size`
    becomes samples per worker (prompts * n / world), `rollout_n` 1, and the deprecated global
    micro-batch keys are turned into `*_per_gpu` (global / world) and set to None."""
    names = {f.name for f in fields(section)}
    changes: Dict[str, Any] = {"ppo_mini_batch_size": int(section.ppo_mini_batch_size) * rollout_n // world,
                               "rollout_n": 1}
    for name in ("ppo_micro_batch_size", "forward_micro_batch_size", "log_prob_micro_batch_size"):
        if name not in names:
            continue
        glob = getattr(section, name)
        if glob is not None:
            if getattr(section, f"{name}_per_gpu") is None:
                changes[f"{name}_per_gpu"] = int(glob) // world
            changes[name] = None
    return replace(section, **changes)


def log_prob_micro_batch(section: Union[RolloutConfig, RefConfig], world: int,
                         fallback: Optional[int]) -> Optional[int]:
    """Samples per log-prob forward on each device: `log_prob_micro_batch_size_per_gpu`, else the
    deprecated global `log_prob_micro_batch_size` / world (at least 1), else `fallback` (the actor's
    `ppo_micro_batch_size_per_gpu`)."""
    if section.log_prob_micro_batch_size_per_gpu:
        return int(section.log_prob_micro_batch_size_per_gpu)
    if section.log_prob_micro_batch_size:
        return max(1, int(section.log_prob_micro_batch_size) // world)
    return fallback


def actor_view(arr: ActorRolloutRefConfig, world: int) -> ActorConfig:
    """The actor section as an `Actor` in a group of `world` workers reads it: per-rank batch sizes,
    the model's packing flag and the rollout section's old-log-prob micro-batching."""
    actor = per_rank_batch_config(arr.actor, arr.rollout.n, world)
    return replace(actor, use_remove_padding=arr.model.use_remove_padding,
                   log_prob_micro_batch_size_per_gpu=log_prob_micro_batch(arr.rollout, world,
                                                                         actor.ppo_micro_batch_size_per_gpu),
                   log_prob_use_dynamic_bsz=arr.rollout.log_prob_use_dynamic_bsz,
                   log_prob_max_token_len_per_gpu=arr.rollout.log_prob_max_token_len_per_gpu)


def ref_view(arr: ActorRolloutRefConfig, world: int) -> RefConfig:
    """The ref section as a `Reference` reads it: its micro-batch (else the actor's per-rank one),
    the actor's log-prob chunk size and the model's packing flag."""
    actor = per_rank_batch_config(arr.actor, arr.rollout.n, world)
    return replace(arr.ref, log_prob_micro_batch_size=None,
                   log_prob_micro_batch_size_per_gpu=log_prob_micro_batch(arr.ref, world,
                                                                         actor.ppo_micro_batch_size_per_gpu),
                   logprob_chunk_size=arr.actor.logprob_chunk_size,
                   use_remove_padding=arr.model.use_remove_padding)


def ref_fsdp_config(arr: ActorRolloutRefConfig) -> FSDPConfig:
    """The reference model's FSDP settings: the actor's, with the ref section's own param_offload."""
    return replace(arr.actor.fsdp_config, param_offload=arr.ref.fsdp_config.param_offload)
