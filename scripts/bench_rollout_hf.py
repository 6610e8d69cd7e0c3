#!/usr/bin/env python
"""Generation speed: HFRollout's KV-cached decoding loop vs `transformers` `model.generate`.

Same tiny random Qwen2, same left-padded prompts, same sampling settings (temperature 1, top-p 1,
no top-k), full response length (a random model almost never emits EOS, so both decode every step).
Prints tokens/s of each and their ratio, measured in this run.

    python scripts/bench_rollout_hf.py [--hidden 256] [--batch 32] [--response-len 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--response-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import GenerationConfig

    from deepretrieval.models.tiny import load_tiny_tokenizer, make_prompt_batch, make_tiny_qwen2
    from deepretrieval.workers.rollout import HFRollout

    torch.set_num_threads(args.threads)
    tok = load_tiny_tokenizer()
    model = make_tiny_qwen2(tok, hidden_size=args.hidden, num_layers=args.layers).eval()
    texts = [f"Find randomized trials of drug {i} for {'chronic ' * (i % 5)}heart failure" for i in range(args.batch)]
    prompts = make_prompt_batch(tok, texts)
    rollout = HFRollout(model, tok, {"response_length": args.response_len, "n": 1, "temperature": 1.0})
    gen_cfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.response_len,
                               min_new_tokens=args.response_len, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    def ours():
        rollout.generate_sequences(prompts)

    def hf_generate():
        with torch.no_grad():
            model.generate(input_ids=prompts.batch["input_ids"], attention_mask=prompts.batch["attention_mask"],
                           generation_config=gen_cfg)

    tokens = args.batch * args.response_len
    results = {}
    for name, fn in (("HFRollout loop", ours), ("model.generate", hf_generate)):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results[name] = statistics.median(times)
    print(f"hidden={args.hidden} layers={args.layers} batch={args.batch} response={args.response_len} threads={args.threads}")
    for name, sec in results.items():
        print(f"{name:<16} {sec:7.3f} s  {tokens / sec:9.0f} tokens/s")
    print(f"speed-up of the loop over generate: {results['model.generate'] / results['HFRollout loop']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
