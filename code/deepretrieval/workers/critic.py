"""The value model (critic) for GAE: a causal-LM backbone with a scalar head.

``V(s_t) = w^T h_{t-1} + b`` where ``h`` are the backbone's final hidden states: the value of a
response token's position is read from the hidden state that *predicts* it (the state before the token
is emitted), the same alignment as the policy's log-probs and as verl's critic.

Mini-/micro-batch arithmetic, gradient clipping and the skip on non-finite gradients follow
:class:`deepretrieval.workers.actor.Actor`.
"""

from __future__ import annotations

import logging
import warnings
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from deepretrieval.algorithms import core_algos
from deepretrieval.protocol import Batch
from deepretrieval.workers.actor import (_mean, enable_gradient_checkpointing, micro_batch_indices, model_device,
                                         split_micro_batches, token_budget)
from deepretrieval.workers.config import CriticConfig
from deepretrieval.workers.optim import LazyOptimizerMixin, clip_grad_and_step
from deepretrieval.workers.packing import packed_values

logger = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """Backbone (a HF base model returning ``last_hidden_state``) + ``nn.Linear(hidden, 1)``."""

    def __init__(self, backbone: nn.Module, head_init_std: Optional[float] = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        dtype = next(backbone.parameters()).dtype
        self.value_head = nn.Linear(hidden, 1, dtype=dtype, device=next(backbone.parameters()).device)
        # Small init (as in OpenRLHF): initial values near 0, the scale of normalised rewards.
        std = head_init_std if head_init_std is not None else 1.0 / (hidden + 1)
        nn.init.normal_(self.value_head.weight, mean=0.0, std=std)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.backbone.config

    def gradient_checkpointing_enable(self) -> None:
        enable_gradient_checkpointing(self.backbone)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Values ``[B, T]`` (float32) for every position."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return self.value_head(out.last_hidden_state).squeeze(-1).float()

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                        override_config: Optional[dict] = None, trust_remote_code: bool = False,
                        enable_gradient_checkpointing: bool = False) -> "ValueModel":
        """Backbone from a HF folder (a causal-LM checkpoint works: its LM head is dropped); the value
        head from ``value_head.safetensors`` in that folder when present, else freshly initialised."""
        from transformers import AutoConfig, AutoModel

        hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        for key, value in dict(override_config or {}).items():
            setattr(hf_config, key, value)
        kwargs: Dict[str, Any] = {"config": hf_config, "trust_remote_code": trust_remote_code}
        if dtype is not None:
            kwargs["dtype"] = dtype
        backbone = AutoModel.from_pretrained(str(path), **kwargs)
        model = cls(backbone)
        head_file = Path(path) / VALUE_HEAD_FILE
        if head_file.is_file():
            from safetensors.torch import load_file

            model.value_head.load_state_dict(load_file(str(head_file)))
        else:
            logger.info("no %s in %s: value head initialised randomly", VALUE_HEAD_FILE, path)
        if enable_gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Backbone as a HF folder plus ``value_head.safetensors`` (what :meth:`from_pretrained` reads)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.backbone.save_pretrained(str(directory))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()},
                  str(Path(directory) / VALUE_HEAD_FILE))


class Critic(LazyOptimizerMixin):
    """PPO value worker. ``config`` is the ``critic`` section
    (:class:`~deepretrieval.workers.config.CriticConfig`: ``ppo_mini_batch_size``,
    ``ppo_micro_batch_size_per_gpu``, ``forward_micro_batch_size_per_gpu``, ``ppo_epochs``, ``shuffle``,
    ``cliprange_value``, ``loss_agg_mode``, ``grad_clip``, ``optim``, ``model.use_remove_padding``)."""

    def __init__(self, model: nn.Module, config: CriticConfig, optimizer: Optional[torch.optim.Optimizer] = None,
                 lr_scheduler: Optional[Any] = None):
        self.model = model
        self.config = config
        self._optimizer = optimizer
        self._lr_scheduler = lr_scheduler
        self._update_calls = 0

    @property
    def use_remove_padding(self) -> bool:
        """Pack each micro-batch's valid tokens into one row (``model.use_remove_padding``)."""
        return bool(self.config.model.use_remove_padding)

    def _values(self, input_ids, attention_mask, position_ids, resp_len: int) -> torch.Tensor:
        if self.use_remove_padding:
            return packed_values(self.model, input_ids, attention_mask, position_ids, resp_len)
        values = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return values[:, -resp_len - 1:-1]

    def compute_values(self, batch: Batch) -> torch.Tensor:
        """Values ``[B, R]`` of the response positions (no grad), zero where ``response_mask`` is 0."""
        micro = (batch.meta_info.get("micro_batch_size")
                 or self.config.forward_micro_batch_size_per_gpu
                 or self.config.ppo_micro_batch_size_per_gpu or len(batch))
        device = model_device(self.model)
        out_device = batch.batch["input_ids"].device
        resp_len = batch.batch["responses"].shape[-1]
        mask = batch.batch["response_mask"] if "response_mask" in batch.tensor_keys else batch.batch["attention_mask"][:, -resp_len:]
        chunks = []
        max_tokens = token_budget(self.config.use_dynamic_bsz, self.config.forward_max_token_len_per_gpu,
                                  self.config.ppo_max_token_len_per_gpu)
        groups, restore = micro_batch_indices(batch, int(micro), max_tokens)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for sl in groups:
                    v = self._values(batch.batch["input_ids"][sl].to(device), batch.batch["attention_mask"][sl].to(device),
                                     batch.batch["position_ids"][sl].to(device), resp_len)
                    chunks.append(v.to(out_device))
        finally:
            self.model.train(was_training)
        values = torch.cat(chunks)
        if restore is not None:
            values = values[restore]
        return values * mask.to(torch.float32)

    def update_critic(self, batch: Batch) -> Dict[str, float]:
        """PPO value-loss epochs; returns mean metrics (``critic/vf_loss``, ``critic/vf_clipfrac``, ...)."""
        cfg = self.config
        keys = ["responses", "input_ids", "attention_mask", "position_ids", "response_mask", "values", "returns"]
        missing = [k for k in keys if k not in batch.tensor_keys]
        if missing:
            raise KeyError(f"update_critic needs batch keys {missing}")
        data = batch.select(batch_keys=keys)
        n = int(batch.meta_info.get("rollout_n") or cfg.rollout_n)
        mini_size = max(1, min(int(cfg.ppo_mini_batch_size) * n, len(data)))
        micro_size = int(cfg.ppo_micro_batch_size_per_gpu or mini_size)
        cliprange_value = cfg.cliprange_value  # null: no value clipping
        agg_mode = str(cfg.loss_agg_mode)
        epochs = int(cfg.ppo_epochs)
        shuffle = bool(cfg.shuffle)
        device = model_device(self.model)
        resp_len = data.batch["responses"].shape[-1]
        optimizer = self.optimizer
        lr_scheduler = self.lr_scheduler  # created before the first optimiser step (LambdaLR counts steps)
        lr = float(optimizer.param_groups[0]["lr"])
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_tokens = token_budget(cfg.use_dynamic_bsz, cfg.ppo_max_token_len_per_gpu)
        metrics: Dict[str, List[float]] = {}
        skipped = steps = 0
        self.model.train()
        for epoch in range(epochs):
            epoch_data = data.shuffle(seed=self._update_calls * 1000 + epoch) if shuffle else data
            for mini in epoch_data.split(mini_size):
                optimizer.zero_grad(set_to_none=True)
                for micro in split_micro_batches(mini, micro_size, max_tokens):
                    t = {k: v.to(device) for k, v in micro.batch.items()}
                    mask = t["response_mask"]
                    vpreds = self._values(t["input_ids"], t["attention_mask"], t["position_ids"], resp_len)
                    vf_loss, vf_clipfrac = core_algos.compute_value_loss(
                        vpreds=vpreds, returns=t["returns"], values=t["values"], response_mask=mask,
                        cliprange_value=None if cliprange_value is None else float(cliprange_value), loss_agg_mode=agg_mode,
                    )
                    (vf_loss * (len(micro) / len(mini))).backward()
                    metrics.setdefault("critic/vf_loss", []).append(float(vf_loss.detach()))
                    metrics.setdefault("critic/vf_clipfrac", []).append(float(vf_clipfrac.detach()))
                    metrics.setdefault("critic/vpred_mean", []).append(float(core_algos.masked_mean(vpreds.detach(), mask)))
                grad_norm, stepped = clip_grad_and_step(params, optimizer, cfg.grad_clip)
                steps += 1
                if stepped:
                    metrics.setdefault("critic/grad_norm", []).append(grad_norm)
                else:
                    skipped += 1
                    logger.warning("critic: non-finite gradient norm (%s); optimiser step skipped", grad_norm)
        with warnings.catch_warnings():
            # with every step skipped torch warns that the scheduler ran before the optimiser; intended
            warnings.simplefilter("ignore", UserWarning)
            lr_scheduler.step()
        self._update_calls += 1
        out = {k: _mean(v) for k, v in metrics.items()}
        out["critic/lr"] = lr
        out["critic/optimizer_steps"] = float(steps - skipped)
        out["critic/skipped_steps"] = float(skipped)
        return out
