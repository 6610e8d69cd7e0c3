#!/usr/bin/env python
"""Train the tiny byte-level BPE tokenizer shipped for tests and CPU smoke runs.

Output: code/deepretrieval/models/assets/tiny_tokenizer/ (a `PreTrainedTokenizerFast` folder that
`AutoTokenizer.from_pretrained` loads), ~4k tokens, Qwen2-style pre-tokenisation (digits split one by
one, byte-level fallback so every string round-trips), ChatML special tokens and chat template.

Training text (deterministic: fixed record order, fixed counts, no shuffling):
  * titles + abstracts of the first N records of data/pubmed_mini/corpus.jsonl.gz
  * the first M trial descriptions of data/trials_sigir/corpus.jsonl.gz
  * a coverage block: ASCII digits/punctuation, JSON snippets, PubMed Boolean syntax,
    `<think>` / `<answer>` tags, so the formats the project's rewards parse are compact.

    python scripts/train_tiny_tokenizer.py [--vocab-size 4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import string
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "code" / "deepretrieval" / "models" / "assets" / "tiny_tokenizer"

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

# Qwen2's pre-tokeniser regex: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, whitespace.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

COVERAGE = [
    string.digits * 4,
    string.punctuation * 4,
    " ".join(string.ascii_letters),
    '{"query": "(diabetes OR \\"type 2 diabetes\\") AND metformin"}',
    '{"query": "", "recall": 0.5, "score": 1.0, "ids": ["12345678", "NCT00000369"]}',
    "<think>The patient population and the intervention define the query.</think>\n"
    '<answer>{"query": "(heart failure[MeSH Terms]) AND (beta blocker OR carvedilol)"}</answer>',
    "<think> </think> <answer> </answer> <think>\n</think>\n<answer>\n</answer>\n",
    "(A OR B) AND (C OR D) NOT E [tiab] [mh] [MeSH Terms] [Title/Abstract] [pt] * ? \" ' ` ~",
    "2019/01/31 1999-12-31 10.1016/j.jclinepi.2020.01.001 p < 0.05 95% CI 1.2-3.4 n = 120",
    "system user assistant You are a helpful assistant. Think step by step, then answer.",
]


def training_texts(data_dir: Path, n_pubmed: int, n_trials: int) -> Iterator[str]:
    with gzip.open(data_dir / "pubmed_mini" / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= n_pubmed:
                break
            rec = json.loads(line)
            yield (rec.get("title") or "") + "\n" + (rec.get("abstract") or "")
    with gzip.open(data_dir / "trials_sigir" / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= n_trials:
                break
            yield json.loads(line).get("text") or ""
    # Repeated so the tags and JSON keys earn merges of their own.
    for _ in range(50):
        yield from COVERAGE


def build_tokenizer(data_dir: Path, vocab_size: int, n_pubmed: int, n_trials: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(data_dir, n_pubmed, n_trials), trainer=trainer)
    return tok


def save(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=32768,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    # transformers 5 writes its own backend class name; the generic fast class (and the template inline)
    # keeps the folder loadable by transformers 4.x and vLLM as well.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["additional_special_tokens"] = [IM_START, IM_END]
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--n-pubmed", type=int, default=6000)
    ap.add_argument("--n-trials", type=int, default=1500)
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    tok = build_tokenizer(args.data_dir, args.vocab_size, args.n_pubmed, args.n_trials)
    save(tok, args.out)
    digest = hashlib.sha256((args.out / "tokenizer.json").read_bytes()).hexdigest()[:16]
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} vocab={tok.get_vocab_size()} bytes={size} tokenizer.json sha256={digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
