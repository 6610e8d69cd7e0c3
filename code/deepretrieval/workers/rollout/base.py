"""The rollout interface and the post-processing every rollout engine shares.

A rollout turns a prompt :class:`~deepretrieval.protocol.Batch` (``input_ids`` / ``attention_mask`` /
``position_ids``, left-padded to ``P``) into a batch with the verl post-rollout keys:

    prompts [B, P]        the left-padded prompt ids
    responses [B, R]      generated ids, right-padded with pad after the first EOS (or cut at R)
    input_ids [B, P+R]    prompts ++ responses
    attention_mask        prompt mask ++ response_mask
    position_ids          prompt positions ++ (last prompt position + 1 .. + R)
    response_mask [B, R]  1 up to and including the first EOS, 0 after it

Sampling settings: training uses the rollout config (``temperature``, ``top_p``, ``top_k``, ``do_sample``,
``n``) with ``meta_info`` overrides; ``meta_info['validate']=True`` uses ``val_kwargs`` (greedy by
default). ``meta_info['no_repeat_ngram_size']`` (either way; evaluation only, the HF rollout only) bans
repeating an n-gram of the response (:mod:`deepretrieval.workers.rollout.no_repeat`). When sampling,
every prompt is repeated ``n`` times, interleaved (``a a b b``), with its non-tensor fields.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence

import torch

from deepretrieval.protocol import Batch
from deepretrieval.workers.config import RolloutConfig
from deepretrieval.workers.rollout.no_repeat import ngram_size


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    do_sample: bool = True
    no_repeat_ngram_size: int = 0  # > 0: the response never repeats an n-gram (rollout.no_repeat; evaluation only)

    @property
    def greedy(self) -> bool:
        return (not self.do_sample) or self.temperature <= 0


PROMPT_KEYS = ("input_ids", "attention_mask", "position_ids")


def check_prompt_keys(prompts: Batch) -> None:
    """KeyError naming the prompt tensors a rollout needs that `prompts` lacks."""
    missing = [k for k in PROMPT_KEYS if k not in prompts.tensor_keys]
    if missing:
        raise KeyError(f"generate_sequences needs prompt keys {missing}")


def resolve_sampling(config: RolloutConfig, meta_info: dict) -> SamplingParams:
    """Sampling settings for one `generate_sequences` call (see the module docstring)."""
    if meta_info.get("validate", False):
        val = config.val_kwargs
        params = SamplingParams(temperature=float(val.temperature), top_p=float(val.top_p), top_k=int(val.top_k),
                                n=int(val.n), do_sample=bool(val.do_sample))
    else:
        params = SamplingParams(
            temperature=float(meta_info.get("temperature", config.temperature)),
            top_p=float(meta_info.get("top_p", config.top_p)),
            top_k=int(meta_info.get("top_k", config.top_k)),
            n=int(meta_info.get("n", config.n)),
            do_sample=bool(meta_info.get("do_sample", config.do_sample)),
        )
    params.no_repeat_ngram_size = ngram_size(meta_info.get("no_repeat_ngram_size"))
    if params.greedy:
        params.n = 1  # n greedy copies would be identical
    if params.n < 1:
        raise ValueError(f"rollout n must be >= 1, got {params.n}")
    return params


def eos_token_ids(tokenizer: Any, model: Any = None) -> List[int]:
    """All ids that end a response: the tokenizer's eos plus the model's (generation) config eos ids."""
    ids: List[int] = []

    def add(value: Any) -> None:
        if value is None:
            return
        for v in (value if isinstance(value, (list, tuple, set)) else [value]):
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    add(getattr(tokenizer, "eos_token_id", None))
    for cfg_name in ("generation_config", "config"):
        add(getattr(getattr(model, cfg_name, None), "eos_token_id", None))
    if not ids:
        raise ValueError("no EOS token id: set tokenizer.eos_token_id")
    return ids


def response_mask_from_eos(responses: torch.Tensor, eos_ids: Sequence[int], lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 for tokens up to and including the first EOS (and before ``lengths``, when given), else 0."""
    is_eos = torch.isin(responses, torch.as_tensor(list(eos_ids), device=responses.device))
    after_eos = (torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()) > 0
    mask = ~after_eos
    if lengths is not None:
        mask &= torch.arange(responses.shape[-1], device=responses.device)[None, :] < lengths[:, None]
    return mask.long()


def pad_responses(token_lists: Iterable[Sequence[int]], response_length: int, pad_id: int) -> torch.Tensor:
    """Right-pad (and cut at ``response_length``) a list of token-id lists into ``[B, R]``."""
    rows = [list(t)[:response_length] for t in token_lists]
    out = torch.full((len(rows), response_length), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def build_rollout_batch(prompts: Batch, responses: torch.Tensor, eos_ids: Sequence[int], pad_id: int,
                        lengths: Optional[torch.Tensor] = None) -> Batch:
    """The post-rollout batch (keys in the module docstring) from ``prompts`` (already repeated n times)
    and ``responses [B, R]``; tokens after the first EOS are replaced by ``pad_id``."""
    prompt_ids = prompts.batch["input_ids"]
    device = prompt_ids.device
    responses = responses.to(device)
    response_mask = response_mask_from_eos(responses, eos_ids, None if lengths is None else lengths.to(device))
    responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, pad_id))
    resp_len = responses.shape[-1]
    prompt_pos = prompts.batch["position_ids"]
    delta = torch.arange(1, resp_len + 1, device=device, dtype=prompt_pos.dtype)
    response_pos = prompt_pos[..., -1:] + delta
    tensors = {
        "prompts": prompt_ids,
        "responses": responses,
        "input_ids": torch.cat([prompt_ids, responses], dim=-1),
        "attention_mask": torch.cat([prompts.batch["attention_mask"], response_mask.to(prompts.batch["attention_mask"].dtype)], dim=-1),
        "position_ids": torch.cat([prompt_pos, response_pos], dim=-1),
        "response_mask": response_mask,
    }
    return Batch.from_dict(tensors, non_tensors=dict(prompts.non_tensor_batch), meta_info=dict(prompts.meta_info))


class BaseRollout(ABC):
    """A generation engine for the rollout role (HF in-process, or a colocated vLLM engine)."""

    def _init_common(self, model: Any, tokenizer: Any, config: RolloutConfig) -> None:
        """What every engine keeps: the policy, tokenizer, rollout config, response length, EOS and pad ids."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.response_length = int(config.response_length or 0)
        if self.response_length <= 0:
            raise ValueError("rollout config needs response_length > 0")
        self.eos_ids = eos_token_ids(tokenizer, model)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])

    @abstractmethod
    def generate_sequences(self, prompts: Batch) -> Batch:
        """Prompt batch -> post-rollout batch (module docstring)."""
