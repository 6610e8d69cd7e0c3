"""The shipped tiny tokenizer and tiny-model factory."""

import hashlib
import subprocess
import sys
from pathlib import Path

import torch

from deepretrieval.models.tiny import TINY_TOKENIZER_DIR, load_tiny_tokenizer, make_tiny_qwen2, save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_special_tokens_and_chat_template():
    tok = load_tiny_tokenizer()
    assert len(tok) == 4096
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1 and tok.padding_side == "left"
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3 and ids.count(tok.eos_token_id) == 2


def test_round_trip_and_compact_formats():
    tok = load_tiny_tokenizer()
    for text in ['<think>PICO first.</think>\n<answer>{"query": "(metformin OR insulin) AND \\"type 2\\""}</answer>',
                 "Résumé: 5 µg/kg, 漢字 and emoji 🙂", "NCT00000369 PMID 12345678 p<0.05"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte-level BPE: lossless on any string
    words = tok(" patients with diabetes were randomized", add_special_tokens=False)["input_ids"]
    assert len(words) <= 7  # common biomedical words are single tokens
    digits = tok("2024", add_special_tokens=False)["input_ids"]
    assert len(digits) == 4  # Qwen2-style: one token per digit


def test_training_script_is_deterministic(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny_tokenizer.py"), "--out", str(tmp_path / "tok")],
                   check=True, capture_output=True)
    fresh = hashlib.sha256((tmp_path / "tok" / "tokenizer.json").read_bytes()).hexdigest()
    shipped = hashlib.sha256((TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()
    assert fresh == shipped
    assert sum(f.stat().st_size for f in TINY_TOKENIZER_DIR.iterdir()) < 400_000


def test_tiny_model_seeded_and_saved(tmp_path):
    tok = load_tiny_tokenizer()
    a, b = make_tiny_qwen2(tok, seed=3), make_tiny_qwen2(tok, seed=3)
    c = make_tiny_qwen2(tok, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    state = torch.random.get_rng_state()
    make_tiny_qwen2(tok, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    path = save_tiny_model(tmp_path / "m", tokenizer=tok, hidden_size=32, seed=3)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.config.hidden_size == 32 and loaded.config.vocab_size == 4096
    assert AutoTokenizer.from_pretrained(path).eos_token == "<|im_end|>"
