"""In-process rollout with a Hugging Face causal LM (CPU or GPU), no extra dependencies.

A plain KV-cached decoding loop rather than ``model.generate``: the loop controls position ids exactly
(the prompt's own positions, then last + 1, + 2, ... — the same ids the actor scores with), stops as
soon as every row has produced an EOS, and applies temperature / top-k / top-p itself, so the sampling
distribution is the one ``Actor.compute_log_prob`` evaluates (logits / temperature).

Speed options (``rollout.hf``; every one leaves the output distribution and the batch layout unchanged,
and greedy outputs token-identical; see docs/configuration.md and docs/benchmarks.md):

- ``shared_prefill``: prefill each prompt once and copy its KV rows to its n samples.
- ``compact_every``: every k steps drop finished rows from the decoding batch (cache rows included).
- ``cache: static``: preallocated KV slots written in place (transformers ``StaticCache``), so a decode
  step has fixed shapes and buffer addresses; ``compile`` then wraps the step in ``torch.compile``
  (mode ``reduce-overhead`` = CUDA graphs on GPU).

Random draws are made for every row of the full batch at every step, whichever rows are still being
decoded, so a seed gives the plain loop's samples with any option; only floating-point differences
between batch shapes (a prefill of B instead of B * n rows, a compacted batch, a static cache's longer
masked attention) can flip a draw that is a near-tie.

``meta_info['no_repeat_ngram_size']`` (evaluation only): the response-only n-gram ban of
:mod:`deepretrieval.workers.rollout.no_repeat`, applied to each live row's logits before the token is chosen.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch

from deepretrieval.protocol import Batch
from deepretrieval.workers.actor import model_device
from deepretrieval.workers.config import RolloutConfig
from deepretrieval.workers.rollout.base import (BaseRollout, SamplingParams, build_rollout_batch, check_prompt_keys,
                                                resolve_sampling)
from deepretrieval.workers.rollout.no_repeat import NGramBlocker, format_token_sequences

logger = logging.getLogger(__name__)

# cache=static compacts to power-of-two batch sizes, not below this many rows
STATIC_MIN_ROWS = 16


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


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None,
                      noise_rows: Optional[Tuple[int, torch.Tensor]] = None) -> torch.Tensor:
    """Next ids ``[B]`` from last-position logits ``[B, V]`` (float32).

    ``noise_rows=(total, index)``: draw the random numbers for ``total`` rows and use rows ``index``, so
    the draws of a row do not depend on which other rows are still in the batch (compaction)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    # Exponential race: argmax_v p_v / E_v with E_v ~ Exp(1) is an exact draw from p (the Gumbel-max
    # trick in another form), and about twice as fast as torch.multinomial on CPU.
    if noise_rows is None:
        noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    else:
        total, index = noise_rows
        noise = probs.new_empty(total, probs.shape[-1]).exponential_(1.0, generator=generator)[index]
    return (probs / noise).argmax(dim=-1)


def _base_forward_params(model: torch.nn.Module) -> set:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _cache_of(out: Any) -> Any:
    """The KV cache a forward returned (transformers 5 names it ``cache``, 4 ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _compile_mode(value: Any, device: torch.device) -> Optional[str]:
    """``rollout.hf.compile``: false/null = eager; true = CUDA graphs on GPU, plain inductor on CPU."""
    if value is None or value is False or str(value).lower() in ("false", "0", "none", ""):
        return None
    if value is True or str(value).lower() in ("true", "1"):
        return "reduce-overhead" if device.type == "cuda" else "default"
    return str(value)


def _last_logits(model: torch.nn.Module, cache_kw: str, cache: Any, ids: torch.Tensor, mask: torch.Tensor,
                 pos: torch.Tensor) -> torch.Tensor:
    """One decode step on a static cache: float32 logits ``[rows, V]`` of the single new position (the
    function ``torch.compile`` wraps; sampling stays outside so it keeps the caller's generator)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    return out.logits[:, -1, :].float()


class _DynamicKV:
    """The plain path: the model's DynamicCache (grown by one slot per step) and a growing 2-D mask."""

    def __init__(self, rollout: "HFRollout", cache: Any, mask: torch.Tensor):
        self.rollout, self.cache, self.mask = rollout, cache, mask

    def bucket(self, live: int) -> int:
        return live  # any batch size is fine for an eager step

    def select(self, idx: torch.Tensor) -> None:
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        out = self.rollout.model(input_ids=token[:, None], attention_mask=self.mask, position_ids=pos[:, None],
                                 use_cache=True, logits_to_keep=1, **{self.rollout._cache_kw: self.cache})
        self.cache = _cache_of(out)
        return out.logits[:, -1, :].float()


class _StaticPool:
    """Preallocated KV buffers ``[rows, kv_heads, P + R, head_dim]`` per layer, kept across calls so a
    compiled step (and its CUDA graphs) sees the same addresses every rollout. Smaller batch sizes (after
    compaction) are StaticCaches whose buffers are views of the first rows of the big one, so compaction
    needs no extra memory: live rows are copied to the front."""

    def __init__(self, model: torch.nn.Module, rows: int, max_len: int, like: List[torch.Tensor]):
        from transformers import StaticCache

        self.model, self.rows, self.max_len = model, rows, max_len
        self.key = self.key_of(max_len, like)
        self.caches: Dict[int, Any] = {}
        base = StaticCache(config=model.config, max_cache_len=max_len)
        if len(base.layers) != len(like) or any(type(layer).__name__ != "StaticLayer" for layer in base.layers):
            # sliding-window / hybrid layers keep a ring buffer, not one slot per position
            raise ValueError("rollout.hf.cache=static supports full-attention models only; use cache=dynamic")
        self._init(base, rows, None, like)
        self.caches[rows] = base

    @staticmethod
    def key_of(max_len: int, like: List[torch.Tensor]) -> Tuple:
        return (max_len, tuple((t.shape[1], t.shape[-1], t.dtype, t.device) for t in like))

    @staticmethod
    def _init(cache: Any, rows: int, base: Any, like: List[torch.Tensor]) -> None:
        for i, (layer, t) in enumerate(zip(cache.layers, like)):
            shape = (0 if base is not None else rows, t.shape[1], 0, t.shape[-1])
            layer.lazy_initialization(t.new_zeros(shape), t.new_zeros(shape))
            if base is not None:  # a view of the first rows of the big buffer
                layer.keys, layer.values = base.layers[i].keys[:rows], base.layers[i].values[:rows]
                layer.batch_size = rows
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)

    def get(self, rows: int) -> Any:
        if rows not in self.caches:
            from transformers import StaticCache

            cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
            like = [layer.keys for layer in self.caches[self.rows].layers]
            self._init(cache, rows, self.caches[self.rows], like)
            self.caches[rows] = cache
        return self.caches[rows]


class _StaticKV:
    """Static path: prompt KV copied into slots ``[0, P)`` of a pooled StaticCache, step t writes slot
    ``P + t``; the mask is a fixed ``[rows, P + R]`` buffer whose column ``P + t`` is switched on before
    step t. Fixed shapes per batch size are what lets ``torch.compile`` capture the step once."""

    def __init__(self, rollout: "HFRollout", prefill_cache: Any, expand: torch.Tensor, mask: torch.Tensor):
        rows, P = expand.shape[0], mask.shape[1]
        self.rollout = rollout
        max_len = P + rollout.response_length
        like = [layer.keys for layer in prefill_cache.layers]
        pool = rollout._static_pool
        if pool is None or pool.rows < rows or pool.key != _StaticPool.key_of(max_len, like):
            pool = rollout._static_pool = _StaticPool(rollout.model, rows, max_len, like)
        self.pool = pool
        self.cache = pool.get(rows)
        for dst, src in zip(self.cache.layers, prefill_cache.layers):
            dst.keys[:, :, :P].copy_(src.keys[expand])
            dst.values[:, :, :P].copy_(src.values[expand])
            dst.cumulative_length.fill_(P)  # next write goes to slot P
        self.mask = mask.new_zeros(rows, max_len)
        self.mask[:, :P] = mask[expand]
        self.slot = P

    def bucket(self, live: int) -> int:
        # powers of two bound the number of compiled shapes (and CUDA graphs); below min_rows a GPU step
        # costs about the same (reading the weights dominates), so no more graphs are compiled for it
        return max(1 << max(live - 1, 0).bit_length(), self.rollout.static_min_rows)

    def select(self, idx: torch.Tensor) -> None:
        new = self.pool.get(idx.shape[0])
        for dst, src in zip(new.layers, self.cache.layers):
            # dst and src view the same buffer; the gather makes a temporary copy first, so no aliasing
            dst.keys.copy_(src.keys[idx])
            dst.values.copy_(src.values[idx])
            dst.cumulative_length.copy_(src.cumulative_length)
        self.cache = new
        self.mask = self.mask[idx]

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.mask[:, self.slot] = 1
        self.slot += 1
        fn = self.rollout._compiled_step or _last_logits
        if self.rollout._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        return fn(self.rollout.model, self.rollout._cache_kw, self.cache, token[:, None], self.mask, pos[:, None])


class HFRollout(BaseRollout):
    """``HFRollout(model, tokenizer, config)``; ``config`` is the ``actor_rollout_ref.rollout`` section
    (``response_length``, ``temperature``, ``top_p``, ``top_k``, ``do_sample``, ``n``, ``val_kwargs``,
    ``micro_batch_size`` = prompts per decoding loop (times n samples), null = all at once, and the speed
    options of ``hf``: ``shared_prefill``, ``compact_every``, ``cache``, ``compile``)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: RolloutConfig):
        self._init_common(model, tokenizer, config)
        params = _base_forward_params(model)
        # transformers 5 renamed past_key_values -> cache (the old name still works with a warning)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

        hf = config.hf  # docs/benchmarks.md has the measurements behind the defaults
        self.shared_prefill = bool(hf.shared_prefill)
        self.compact_every = int(hf.compact_every)
        self.cache_impl = str(hf.cache)
        if self.cache_impl not in ("dynamic", "static"):
            raise ValueError(f"rollout.hf.cache must be dynamic or static, got {self.cache_impl!r}")
        if self.compact_every < 0:
            raise ValueError(f"rollout.hf.compact_every must be >= 0, got {self.compact_every}")
        mode = _compile_mode(hf.compile, model_device(model))
        if mode is not None and self.cache_impl != "static":
            # a dynamic cache changes shape every step: the compiled step would recompile every step
            raise ValueError("rollout.hf.compile needs rollout.hf.cache=static")
        self._static_pool: Optional[_StaticPool] = None
        self.static_min_rows = STATIC_MIN_ROWS
        self._cuda_graphs = mode == "reduce-overhead" and model_device(model).type == "cuda"
        self._compiled_step = None
        self._tag_sequences: Optional[List[Tuple[int, ...]]] = None
        if mode is not None:
            # each compaction bucket is one more compiled shape; the default limit (8) would fall back to eager
            dynamo = torch._dynamo.config
            limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # torch < 2.6
            setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
            self._compiled_step = torch.compile(_last_logits, mode=mode, dynamic=False)

    @torch.no_grad()
    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Responses ``[B * n, R]`` for ``B`` prompts, ``n = params.n`` samples each, interleaved (``a a b b``)."""
        bsz, device, n = input_ids.shape[0], input_ids.device, params.n
        rows = bsz * n
        # decoding row -> prompt row: the n samples of a prompt are adjacent, as in Batch.repeat(interleave)
        expand = torch.arange(bsz, device=device).repeat_interleave(n)
        if not self.shared_prefill and n > 1:  # prefill n identical copies (the plain loop)
            input_ids, attention_mask, position_ids = input_ids[expand], attention_mask[expand], position_ids[expand]
            expand = torch.arange(rows, device=device)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()[expand]
        if self.cache_impl == "static":
            kv = _StaticKV(self, _cache_of(out), expand, attention_mask)
        else:
            cache = _cache_of(out)
            if expand.shape[0] != input_ids.shape[0]:
                cache.batch_repeat_interleave(n)
            kv = _DynamicKV(self, cache, attention_mask[expand])
        next_pos = position_ids[expand, -1] + 1
        del out

        eos = torch.as_tensor(self.eos_ids, device=device)
        # one scratch row at the end receives the tokens of compaction padding rows, then is dropped
        responses = torch.full((rows + 1, self.response_length), self.pad_id, dtype=torch.long, device=device)
        owner = torch.arange(rows, device=device)  # decoding row -> output row
        noise_rows = None  # after a compaction: draw for all rows, keep the live rows' draws (same samples)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        blocker = (NGramBlocker(params.no_repeat_ngram_size, rows, self.eos_ids, self._format_sequences())
                   if params.no_repeat_ngram_size else None)
        for step in range(self.response_length):
            if blocker is not None:
                live_rows, done_rows = owner.tolist(), finished.tolist()
                logits = blocker.mask(logits, live_rows, done_rows)
            token = sample_next_token(logits, params, generator, noise_rows)
            if blocker is not None:
                blocker.add_step(live_rows, token.tolist(), done_rows)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            responses[owner, step] = token
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or step == self.response_length - 1:
                break
            if self.compact_every and (step + 1) % self.compact_every == 0:
                live = (~finished).nonzero().squeeze(-1)
                size = kv.bucket(live.shape[0])
                if size < finished.shape[0]:
                    # pad to the bucket size with copies of a live row (valid cache and mask, so no NaN);
                    # they count as finished and write to the scratch row
                    idx = torch.cat([live, live[-1:].expand(size - live.shape[0])])
                    kv.select(idx)
                    token, next_pos = token[idx], next_pos[idx]
                    owner = torch.cat([owner[live], owner.new_full((size - live.shape[0],), rows)])
                    finished = torch.arange(size, device=device) >= live.shape[0]
                    noise_rows = (rows, owner.clamp(max=rows - 1))
            logits = kv.step(token, next_pos)
            next_pos = next_pos + 1
        return responses[:rows]

    def _format_sequences(self) -> List[Tuple[int, ...]]:
        """The answer tags' token sequences, which no-repeat decoding never bans (no_repeat.format_token_sequences)."""
        if self._tag_sequences is None:
            self._tag_sequences = format_token_sequences(self.tokenizer)
        return self._tag_sequences

    def generate_sequences(self, prompts: Batch) -> Batch:
        check_prompt_keys(prompts)
        params = resolve_sampling(self.config, prompts.meta_info)
        seed = prompts.meta_info.get("seed")
        generator = None
        device = model_device(self.model)
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))
        # `micro_batch_size` counts prompts; each brings its n samples into the same decoding loop
        micro = int(self.config.micro_batch_size or 0) or len(prompts)
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
        if params.n > 1:
            prompts = prompts.repeat(params.n, interleave=True)
        out = build_rollout_batch(prompts, torch.cat(chunks), self.eos_ids, self.pad_id)
        # `temperature` is what the actor divides logits by when it scores these samples. (No `rollout_n`
        # here: the actor would multiply its mini-batch size by it, which the trainer has already done.)
        out.meta_info.update({"temperature": params.temperature if not params.greedy else 1.0,
                              "do_sample": not params.greedy})
        return out
