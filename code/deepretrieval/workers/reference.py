"""The reference policy for KL terms: a frozen copy of the initial actor, or — with LoRA — the actor's
own model with its adapter switched off (``with model.disable_adapter():``), which costs no memory."""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Optional

import torch
from torch import nn

from deepretrieval.protocol import Batch
from deepretrieval.workers.actor import Actor, batched_response_log_probs, token_budget
from deepretrieval.workers.lora import is_peft_model  # noqa: F401  (re-exported)
from deepretrieval.workers.config import RefConfig


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere (the reference for full fine-tuning)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


class Reference:
    """``Reference(model_or_actor, config=None, disable_adapter=None)``.

    * a separate frozen model: its parameters are frozen here;
    * a LoRA (peft) model or an :class:`Actor` holding one: log-probs are computed with the adapter
      disabled, i.e. under the base weights. ``disable_adapter=None`` detects peft models.
    An :class:`Actor` without LoRA is rejected: its weights move, so it cannot be the reference.

    ``config`` is the ``ref`` section (:class:`~deepretrieval.workers.config.RefConfig`:
    ``log_prob_micro_batch_size_per_gpu``, dynamic batching, ``logprob_chunk_size``, ``use_remove_padding``).
    """

    def __init__(self, model: Any, config: Optional[RefConfig] = None, disable_adapter: Optional[bool] = None):
        shared = isinstance(model, Actor)
        if shared:
            model = model.model
        self.disable_adapter = is_peft_model(model) if disable_adapter is None else bool(disable_adapter)
        if self.disable_adapter and not is_peft_model(model):
            raise ValueError("disable_adapter=True needs a peft (LoRA) model")
        if shared and not self.disable_adapter:
            raise ValueError("the reference cannot share a fully fine-tuned actor's model; pass frozen_copy(actor.model)")
        if not self.disable_adapter:
            for p in model.parameters():
                p.requires_grad_(False)
        self.model = model
        self.config = config if config is not None else RefConfig()

    def compute_ref_log_prob(self, batch: Batch) -> torch.Tensor:
        """Reference log-probs ``[B, R]`` (float32, no grad) of ``batch['responses']``."""
        micro = batch.meta_info.get("micro_batch_size") or self.config.log_prob_micro_batch_size_per_gpu
        temperature = float(batch.meta_info.get("temperature", 1.0) or 1.0)
        chunk = max(0, int(self.config.logprob_chunk_size or 0))
        ctx = self.model.disable_adapter() if self.disable_adapter else contextlib.nullcontext()
        with ctx:
            max_tokens = token_budget(self.config.log_prob_use_dynamic_bsz, self.config.log_prob_max_token_len_per_gpu)
            log_probs, _ = batched_response_log_probs(
                self.model, batch, micro, temperature, chunk,
                use_remove_padding=bool(self.config.use_remove_padding), max_token_len=max_tokens)
        return log_probs
