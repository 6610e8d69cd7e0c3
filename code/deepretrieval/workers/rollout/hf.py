"""In-process rollout with a Hugging Face causal LM (CPU or GPU), no extra dependencies.

A plain KV-cached decoding loop rather than ``model.generate``: the loop controls position ids exactly
(the prompt's own positions, then last + 1, + 2, ... — the same ids the actor scores with), stops as
soon as every row has produced an EOS, and applies temperature / top-k / top-p itself, so the sampling
distribution is the one ``Actor.compute_log_prob`` evaluates (logits / temperature).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, List, Optional

import torch

from deepretrieval.protocol import Batch
from deepretrieval.workers.actor import model_device
from deepretrieval.workers.optim import _get
from deepretrieval.workers.rollout.base import (BaseRollout, SamplingParams, build_rollout_batch, eos_token_ids,
                                                resolve_sampling)

logger = logging.getLogger(__name__)


def filter_logits(logits: torch.Tensor, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest nucleus with mass >= top_p to -inf.

    The most likely token always survives (top_p -> 0 degenerates to greedy, not to an empty set).
    """
    vocab = logits.shape[-1]
    if top_k is not None and 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # mass strictly before each token; drop tokens once the mass before them reaches top_p
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next ids ``[B]`` from last-position logits ``[B, V]`` (float32)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    # Exponential race: argmax_v p_v / E_v with E_v ~ Exp(1) is an exact draw from p (the Gumbel-max
    # trick in another form), and about twice as fast as torch.multinomial on CPU.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


def _base_forward_params(model: torch.nn.Module) -> set:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


class HFRollout(BaseRollout):
    """``HFRollout(model, tokenizer, config)``; ``config`` is the ``actor_rollout_ref.rollout`` section
    (``response_length``, ``temperature``, ``top_p``, ``top_k``, ``do_sample``, ``n``, ``val_kwargs``,
    ``micro_batch_size`` = prompts per decoding loop (times n samples), null = all at once)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.response_length = int(_get(config, "response_length", 0))
        if self.response_length <= 0:
            raise ValueError("rollout config needs response_length > 0")
        self.eos_ids = eos_token_ids(tokenizer, model)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        params = _base_forward_params(model)
        # transformers 5 renamed past_key_values -> cache (the old name still works with a warning)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @torch.no_grad()
    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
        bsz = input_ids.shape[0]
        device = input_ids.device
        eos = torch.as_tensor(self.eos_ids, device=device)
        responses = torch.full((bsz, self.response_length), self.pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        next_pos = position_ids[:, -1] + 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1)
        for step in range(self.response_length):
            token = sample_next_token(out.logits[:, -1, :].float(), params, generator)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            responses[:, step] = token
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or step == self.response_length - 1:
                break
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
            out = self.model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_pos[:, None],
                             use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
            next_pos = next_pos + 1
        return responses

    def generate_sequences(self, prompts: Batch) -> Batch:
        missing = [k for k in ("input_ids", "attention_mask", "position_ids") if k not in prompts.tensor_keys]
        if missing:
            raise KeyError(f"generate_sequences needs prompt keys {missing}")
        params = resolve_sampling(self.config, prompts.meta_info)
        if params.n > 1:
            prompts = prompts.repeat(params.n, interleave=True)
        seed = prompts.meta_info.get("seed")
        generator = None
        device = model_device(self.model)
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))
        # `micro_batch_size` counts prompts; each brings its n samples into the same decoding loop
        micro = int(_get(self.config, "micro_batch_size", 0) or 0) * params.n or len(prompts)
        was_training = self.model.training
        self.model.eval()
        chunks: List[torch.Tensor] = []
        try:
            for start in range(0, len(prompts), micro):
                sl = slice(start, start + micro)
                chunks.append(self._decode(prompts.batch["input_ids"][sl].to(device),
                                           prompts.batch["attention_mask"][sl].to(device),
                                           prompts.batch["position_ids"][sl].to(device), params, generator))
        finally:
            self.model.train(was_training)
        out = build_rollout_batch(prompts, torch.cat(chunks), self.eos_ids, self.pad_id)
        # `temperature` is what the actor divides logits by when it scores these samples. (No `rollout_n`
        # here: the actor would multiply its mini-batch size by it, which the trainer has already done.)
        out.meta_info.update({"temperature": params.temperature if not params.greedy else 1.0,
                              "do_sample": not params.greedy})
        return out
