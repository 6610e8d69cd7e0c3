"""Tiny, offline models for tests and CPU smoke runs.

The tokenizer is shipped in `models/assets/tiny_tokenizer` (a ~4k-token byte-level BPE trained on the
vendored PubMed/trial text by `scripts/train_tiny_tokenizer.py`, with ChatML special tokens and a
Qwen-style chat template). Models are randomly initialised `Qwen2ForCausalLM`s sized so a PPO step
runs in well under a second on two CPU cores. Nothing here touches the network.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch

logger = logging.getLogger(__name__)

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"


def load_tiny_tokenizer(padding_side: str = "left"):
    """The shipped tiny tokenizer (`PreTrainedTokenizerFast`; pad `<|endoftext|>`, eos `<|im_end|>`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    tok.padding_side = padding_side
    return tok


def make_tiny_qwen2(
    tokenizer=None,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    num_attention_heads: Optional[int] = None,
    num_key_value_heads: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
    dtype: torch.dtype = torch.float32,
    **kw: Any,
):
    """A randomly initialised `Qwen2ForCausalLM` matching `tokenizer` (default: the tiny tokenizer).

    Heads default to `hidden_size // 16` (head_dim 16) with 2 KV heads (grouped-query attention, as in
    the real Qwen2 models); extra keyword arguments go to `Qwen2Config`.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tokenizer if tokenizer is not None else load_tiny_tokenizer()
    heads = num_attention_heads or max(1, hidden_size // 16)
    kv_heads = num_key_value_heads or (2 if heads % 2 == 0 else 1)
    eos_ids = [tokenizer.eos_token_id]
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids[0],
        bos_token_id=None,
        **kw,
    )
    # Seeded here (and restored afterwards) so the same call always gives the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = eos_ids[0]
    return model.to(dtype)


def save_tiny_model(directory: Union[str, Path], tokenizer=None, **make_kwargs: Any) -> str:
    """Write a tiny model and its tokenizer to `directory` (a HF folder usable as `model.path`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer if tokenizer is not None else load_tiny_tokenizer()
    model = make_tiny_qwen2(tokenizer=tokenizer, **make_kwargs)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    logger.info("saved tiny Qwen2 (%d params) to %s", sum(p.numel() for p in model.parameters()), directory)
    return str(directory)


def make_prompt_batch(tokenizer, texts, apply_chat_template: bool = True, meta_info: Optional[dict] = None):
    """A left-padded prompt :class:`~deepretrieval.protocol.Batch` (input_ids, attention_mask,
    position_ids = cumsum(mask) - 1 clamped at 0, as the dataset builds them) for quick experiments."""
    from deepretrieval.protocol import Batch

    if apply_chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
                 for t in texts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    mask = enc["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch.from_dict({"input_ids": enc["input_ids"], "attention_mask": mask, "position_ids": position_ids},
                           meta_info=dict(meta_info or {}))
