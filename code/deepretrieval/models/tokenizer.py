"""Loading a Hugging Face tokenizer the way every part of the project needs it."""

from __future__ import annotations

from typing import Any, Optional


def load_tokenizer(path: Any, padding_side: Optional[str] = None, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(path)`` with a pad token (the EOS token when the model has none,
    as for Qwen/Llama base tokenizers) and, when given, ``padding_side`` ("left" for generation)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=bool(trust_remote_code))
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
