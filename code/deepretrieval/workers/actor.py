"""The policy (actor) role: log-probs of rollouts and the PPO policy update.

``Actor(model, config)`` wraps a Hugging Face causal LM (plain, LoRA-wrapped by peft, or FSDP2-sharded
by the trainer) and reads the ``actor_rollout_ref.actor`` config section (verl key names).

Batch arithmetic of :meth:`Actor.update_policy`: a mini-batch (one optimiser step) holds
``ppo_mini_batch_size * rollout_n`` samples, where ``rollout_n`` comes from ``meta_info['rollout_n']`` or
the config field ``rollout_n`` (default 1) — so a config already normalised to samples per worker
(``workers.config.per_rank_batch_config``) is used as is. Each mini-batch is processed in micro-batches of
``ppo_micro_batch_size_per_gpu`` samples whose losses are scaled by ``len(micro) / len(mini)``, so the
accumulated gradient equals that of the whole mini-batch. Gradients are clipped to ``grad_clip``; a step
whose gradient norm is not finite is skipped (``actor/skipped_steps``). The LR scheduler advances once
per call (one training step), as in verl.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from deepretrieval.algorithms import core_algos
from deepretrieval.protocol import Batch
from deepretrieval.workers.logprob import DEFAULT_CHUNK_SIZE, response_log_probs
from deepretrieval.workers.config import ActorConfig, ModelConfig
from deepretrieval.workers.optim import LazyOptimizerMixin, clip_grad_and_step
from deepretrieval.workers.packing import packed_response_log_probs
from deepretrieval.workers.seqbalance import inverse_permutation, token_budget_micro_batches

logger = logging.getLogger(__name__)

LOG_PROB_KEYS = ("responses", "input_ids", "attention_mask", "position_ids")


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _mean(values: List[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def batched_response_log_probs(
    model: torch.nn.Module,
    batch: Batch,
    micro_batch_size: Optional[int],
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    calculate_entropy: bool = False,
    use_remove_padding: bool = False,
    max_token_len: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """No-grad log-probs ``[B, R]`` (and entropies) of ``batch['responses']``, ``micro_batch_size`` rows per forward.

    ``max_token_len`` (dynamic batch size): micro-batches are instead formed by valid-token budget
    (:func:`deepretrieval.workers.seqbalance.token_budget_micro_batches`) and the results put back in
    batch order. ``use_remove_padding``: each micro-batch runs as one packed row
    (:mod:`deepretrieval.workers.packing`). Results are float32 on the device of the batch's tensors.
    """
    missing = [k for k in LOG_PROB_KEYS if k not in batch.tensor_keys]
    if missing:
        raise KeyError(f"log-prob computation needs batch keys {missing}")
    out_device = batch.batch["input_ids"].device
    device = model_device(model)
    resp_len = batch.batch["responses"].shape[-1]
    log_probs, entropies = [], []
    groups, restore = micro_batch_indices(batch, micro_batch_size, max_token_len)
    forward = packed_response_log_probs if use_remove_padding else response_log_probs
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for sl in groups:
                lp, ent = forward(
                    model,
                    batch.batch["input_ids"][sl].to(device),
                    batch.batch["attention_mask"][sl].to(device),
                    batch.batch["position_ids"][sl].to(device),
                    resp_len,
                    temperature=temperature,
                    chunk_size=chunk_size,
                    calculate_entropy=calculate_entropy,
                )
                log_probs.append(lp.to(out_device))
                if ent is not None:
                    entropies.append(ent.to(out_device))
    finally:
        model.train(was_training)
    log_probs_t = torch.cat(log_probs)
    entropy_t = torch.cat(entropies) if calculate_entropy else None
    if restore is not None:
        log_probs_t = log_probs_t[restore]
        entropy_t = entropy_t[restore] if entropy_t is not None else None
    return log_probs_t, entropy_t


def micro_batch_indices(batch: Batch, micro_batch_size: Optional[int], max_token_len: Optional[int] = None):
    """Row selectors for the micro-batches of ``batch`` and the permutation that restores batch order.

    Fixed size: contiguous slices of ``micro_batch_size`` rows, restore ``None``. Token budget
    (``max_token_len`` > 0): index tensors from
    :func:`~deepretrieval.workers.seqbalance.token_budget_micro_batches` over the valid-token counts,
    and ``restore`` such that ``cat(results)[restore]`` is in batch order.
    """
    n = len(batch)
    if max_token_len:
        lens = batch.batch["attention_mask"].sum(-1)
        groups = token_budget_micro_batches(lens, int(max_token_len))
        order = [i for g in groups for i in g]
        return [torch.as_tensor(g, dtype=torch.long) for g in groups], torch.as_tensor(inverse_permutation(order))
    micro = int(micro_batch_size) if micro_batch_size and micro_batch_size > 0 else n
    return [slice(start, min(start + micro, n)) for start in range(0, n, micro)], None


def token_budget(dynamic: bool, *budgets: Optional[int]) -> Optional[int]:
    """The dynamic-batch token budget: with ``dynamic`` (``use_dynamic_bsz`` / ``log_prob_use_dynamic_bsz``)
    the first set of ``budgets``, else None (fixed-size micro-batches)."""
    if not dynamic:
        return None
    for value in budgets:
        if value:
            return int(value)
    return None


def split_micro_batches(mini: Batch, micro_size: int, max_token_len: Optional[int] = None) -> List[Batch]:
    """Micro-batches of an update: ``micro_size`` rows each, or by valid-token budget with ``max_token_len``."""
    if not max_token_len:
        return mini.split(micro_size)
    groups, _ = micro_batch_indices(mini, None, max_token_len)
    return [mini[g] for g in groups]


class Actor(LazyOptimizerMixin):
    """PPO policy worker around a causal LM.

    Args:
        model: a causal LM exposing ``get_output_embeddings()`` (HF / peft / FSDP2-wrapped HF).
        config: the actor section (:class:`~deepretrieval.workers.config.ActorConfig`): ``ppo_mini_batch_size``,
            ``ppo_micro_batch_size_per_gpu``, ``ppo_epochs``, ``shuffle``, ``clip_ratio(_low/_high/_c)``,
            ``loss_agg_mode``, ``entropy_coeff``, ``use_kl_loss``, ``kl_loss_coef``, ``kl_loss_type``,
            ``policy_loss.loss_mode`` (a registered policy loss), ``grad_clip``, ``logprob_chunk_size``,
            ``log_prob_micro_batch_size_per_gpu``, ``optim``; and for the
            fast path ``use_remove_padding`` (packed forwards), ``use_dynamic_bsz`` +
            ``ppo_max_token_len_per_gpu`` (update micro-batches by token budget), ``log_prob_use_dynamic_bsz``
            + ``log_prob_max_token_len_per_gpu`` (the same for :meth:`compute_log_prob`).
        optimizer / lr_scheduler: built from ``config.optim`` on first use when not given.
    """

    def __init__(self, model: torch.nn.Module, config: ActorConfig, optimizer: Optional[torch.optim.Optimizer] = None,
                 lr_scheduler: Optional[Any] = None):
        self.model = model
        self.config = config
        self._optimizer = optimizer
        self._lr_scheduler = lr_scheduler
        self._update_calls = 0

    @property
    def chunk_size(self) -> int:
        """Tokens per log-prob chunk; 0 = sized from the vocabulary (logprob.auto_chunk_size)."""
        return max(0, int(self.config.logprob_chunk_size or 0))

    # -- log-probs ---------------------------------------------------------------------------------
    def compute_log_prob(self, batch: Batch, calculate_entropy: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Log-probs ``[B, R]`` of the responses under the current policy (no grad), and entropies if asked.

        Micro-batch: ``meta_info['micro_batch_size']``, else ``log_prob_micro_batch_size_per_gpu``, else
        ``ppo_micro_batch_size_per_gpu``, else the whole batch. Logits are divided by
        ``meta_info['temperature']`` (default 1.0), matching the sampling distribution.
        """
        micro = (batch.meta_info.get("micro_batch_size")
                 or self.config.log_prob_micro_batch_size_per_gpu
                 or self.config.ppo_micro_batch_size_per_gpu)
        temperature = float(batch.meta_info.get("temperature", 1.0) or 1.0)
        max_tokens = token_budget(self.config.log_prob_use_dynamic_bsz, self.config.log_prob_max_token_len_per_gpu)
        return batched_response_log_probs(self.model, batch, micro, temperature, self.chunk_size, calculate_entropy,
                                          use_remove_padding=self.use_remove_padding, max_token_len=max_tokens)

    @property
    def use_remove_padding(self) -> bool:
        """Pack each micro-batch's valid tokens into one row (:mod:`deepretrieval.workers.packing`)."""
        return bool(self.config.use_remove_padding)

    # -- policy update -----------------------------------------------------------------------------
    def _mini_batch_size(self, batch: Batch) -> int:
        n = int(batch.meta_info.get("rollout_n") or self.config.rollout_n)
        mini = int(self.config.ppo_mini_batch_size) * n
        return max(1, min(mini, len(batch)))

    def update_policy(self, batch: Batch) -> Dict[str, float]:
        """PPO epochs over ``batch``; returns mean metrics (``actor/pg_loss``, ``actor/grad_norm``, ...)."""
        cfg = self.config
        use_kl_loss = bool(cfg.use_kl_loss)
        # without old_log_probs (actor.recompute_old_log_prob=false, one optimiser step per batch, checked
        # by the trainer's config) the sampling policy is the current one: its log-probs, detached
        on_policy = not cfg.recompute_old_log_prob and "old_log_probs" not in batch.tensor_keys
        keys = ["responses", "input_ids", "attention_mask", "position_ids", "response_mask", "advantages"]
        if not on_policy:
            keys.append("old_log_probs")
        if use_kl_loss:
            keys.append("ref_log_prob")
        missing = [k for k in keys if k not in batch.tensor_keys]
        if missing:
            raise KeyError(f"update_policy needs batch keys {missing}")
        data = batch.select(batch_keys=keys)
        temperature = float(batch.meta_info.get("temperature", 1.0) or 1.0)
        entropy_coeff = float(cfg.entropy_coeff)
        clip_ratio = float(cfg.clip_ratio)
        clip_low, clip_high = cfg.clip_ratio_low, cfg.clip_ratio_high
        clip_c = None if cfg.clip_ratio_c is None else float(cfg.clip_ratio_c)  # null disables the dual clip
        agg_mode = str(cfg.loss_agg_mode)
        kl_coef = float(cfg.kl_loss_coef)
        kl_type = str(cfg.kl_loss_type)
        policy_loss = core_algos.get_policy_loss_fn(cfg.policy_loss.loss_mode)
        grad_clip = cfg.grad_clip
        epochs = int(cfg.ppo_epochs)
        shuffle = bool(cfg.shuffle)
        mini_size = self._mini_batch_size(batch)
        if on_policy and (epochs != 1 or mini_size < len(batch)):
            raise ValueError("update without old_log_probs needs one optimiser step per batch (ppo_epochs=1, one "
                             f"mini-batch), got ppo_epochs={epochs}, mini-batch {mini_size} of {len(batch)} samples")
        micro_size = int(cfg.ppo_micro_batch_size_per_gpu or mini_size)
        device = model_device(self.model)
        resp_len = data.batch["responses"].shape[-1]
        optimizer = self.optimizer
        lr_scheduler = self.lr_scheduler  # created before the first optimiser step (LambdaLR counts steps)
        lr = float(optimizer.param_groups[0]["lr"])
        params = [p for p in self.model.parameters() if p.requires_grad]
        forward = packed_response_log_probs if self.use_remove_padding else response_log_probs
        max_tokens = token_budget(cfg.use_dynamic_bsz, cfg.ppo_max_token_len_per_gpu)

        metrics: Dict[str, List[float]] = {}

        def record(name: str, value: Any) -> None:
            metrics.setdefault(name, []).append(float(value.detach().item() if torch.is_tensor(value) else value))

        skipped = steps = 0
        self.model.train()
        for epoch in range(epochs):
            epoch_data = data.shuffle(seed=self._update_calls * 1000 + epoch) if shuffle else data
            for mini in epoch_data.split(mini_size):
                optimizer.zero_grad(set_to_none=True)
                for micro in split_micro_batches(mini, micro_size, max_tokens):
                    t = {k: v.to(device) for k, v in micro.batch.items()}
                    mask = t["response_mask"]
                    log_prob, entropy = forward(
                        self.model, t["input_ids"], t["attention_mask"], t["position_ids"], resp_len,
                        temperature=temperature, chunk_size=self.chunk_size, calculate_entropy=entropy_coeff != 0,
                    )
                    pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = policy_loss(
                        old_log_prob=log_prob.detach() if on_policy else t["old_log_probs"], log_prob=log_prob, advantages=t["advantages"],
                        response_mask=mask, cliprange=clip_ratio, cliprange_low=clip_low, cliprange_high=clip_high,
                        clip_ratio_c=clip_c, loss_agg_mode=agg_mode,
                    )
                    loss = pg_loss
                    if entropy is not None:
                        entropy_loss = core_algos.compute_entropy_loss(entropy, mask, agg_mode)
                        loss = loss - entropy_coeff * entropy_loss
                        record("actor/entropy", entropy_loss)
                    if use_kl_loss:
                        kl_loss = core_algos.compute_kl_loss(log_prob, t["ref_log_prob"], mask, kl_type, agg_mode)
                        loss = loss + kl_coef * kl_loss
                        record("actor/kl_loss", kl_loss)
                        record("actor/kl_coef", kl_coef)
                    (loss * (len(micro) / len(mini))).backward()
                    record("actor/pg_loss", pg_loss)
                    record("actor/pg_clipfrac", pg_clipfrac)
                    record("actor/ppo_kl", ppo_kl)
                    record("actor/pg_clipfrac_lower", pg_clipfrac_lower)
                grad_norm, stepped = clip_grad_and_step(params, optimizer, grad_clip)
                steps += 1
                if stepped:
                    record("actor/grad_norm", grad_norm)
                else:
                    skipped += 1
                    logger.warning("actor: non-finite gradient norm (%s); optimiser step skipped", grad_norm)
        with warnings.catch_warnings():
            # with every step skipped torch warns that the scheduler ran before the optimiser; intended
            warnings.simplefilter("ignore", UserWarning)
            lr_scheduler.step()
        self._update_calls += 1
        out = {k: _mean(v) for k, v in metrics.items()}
        out["actor/lr"] = lr
        out["actor/optimizer_steps"] = float(steps - skipped)
        out["actor/skipped_steps"] = float(skipped)
        return out


# -- model construction ------------------------------------------------------------------------------

def apply_lora(model: torch.nn.Module, lora_rank: int, lora_alpha: int = 16, target_modules: Any = "all-linear"):
    """Wrap `model` in a peft LoRA adapter (base weights frozen; `model.disable_adapter()` gives the reference)."""
    from peft import LoraConfig, TaskType, get_peft_model

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    elif target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
    alpha = float(lora_alpha)
    lora_cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=int(lora_rank), lora_alpha=int(alpha) if alpha.is_integer() else alpha,
                          target_modules=target_modules, bias="none")
    return get_peft_model(model, lora_cfg)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute decoder-layer activations in backward (transformers >= 5 calls it activation checkpointing).

    Non-reentrant checkpointing needs no input grads, so it also works with frozen (LoRA) bases.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_actor_model(model_cfg: ModelConfig, dtype: Optional[torch.dtype] = None, device: Optional[Any] = None):
    """Causal LM from ``model_cfg.path`` with ``override_config``, gradient checkpointing and LoRA applied.

    ``model_cfg`` is the ``actor_rollout_ref.model`` section. Loads offline (no hub access is attempted
    for local folders).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = str(model_cfg.path)
    trust = bool(model_cfg.trust_remote_code)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    for key, value in dict(model_cfg.override_config or {}).items():
        setattr(hf_config, key, value)
    kwargs: Dict[str, Any] = {"config": hf_config, "trust_remote_code": trust}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None:
        model = model.to(device)
    if model_cfg.enable_gradient_checkpointing:
        enable_gradient_checkpointing(model)
    rank = int(model_cfg.lora_rank or 0)
    if rank > 0:
        model = apply_lora(model, rank, model_cfg.lora_alpha, model_cfg.target_modules)
    return model
