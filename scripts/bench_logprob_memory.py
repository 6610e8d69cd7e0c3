#!/usr/bin/env python
"""Peak memory (and time) of response log-probs: chunked path vs naive full-logits path.

Each measurement runs in a fresh subprocess (so allocator caches and earlier peaks do not leak
between runs). On CPU the figure is the rise of the process's peak resident set size
(``ru_maxrss``) over its resident size just before the computation; on CUDA it is
``torch.cuda.max_memory_allocated`` minus the allocation before the computation.

Modes: ``inference`` = old/ref log-probs under ``no_grad`` (with entropy, as the trainer asks);
``train`` = forward + backward of ``sum(log_probs)`` as in the policy update.

    python scripts/bench_logprob_memory.py                    # defaults below, CPU
    python scripts/bench_logprob_memory.py --vocab 151936 --batch 4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> dict:
    import resource

    import psutil
    import torch

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from deepretrieval.workers.logprob import naive_response_log_probs, response_log_probs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 16), num_key_value_heads=2,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).to(device)
    T = args.prompt_len + args.response_len
    ids = torch.randint(0, args.vocab, (args.batch, T), device=device)
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def run(bsz: int):
        i, m, p = ids[:bsz], mask[:bsz], pos[:bsz]
        train = args.mode == "train"
        ctx = torch.enable_grad() if train else torch.no_grad()
        with ctx:
            if args.path == "naive":
                lp, ent = naive_response_log_probs(model, i, m, p, args.response_len, calculate_entropy=not train)
            else:
                lp, ent = response_log_probs(model, i, m, p, args.response_len, chunk_size=args.chunk_size,
                                             calculate_entropy=not train)
            if train:
                lp.sum().backward()
                model.zero_grad(set_to_none=True)
        return lp

    run(1)  # warm-up: kernels, allocator pools
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = psutil.Process().memory_info().rss
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    run(args.batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = peak_after - before if peak_after > peak_before else float("nan")
    return {"path": args.path, "mode": args.mode, "chunk_size": args.chunk_size, "peak_mb": peak / 2**20,
            "seconds": elapsed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=192)
    ap.add_argument("--chunk-sizes", type=str, default="0,256,64", help="tokens per chunk; 0 = auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", type=str, default="cpu")
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration (the median is reported)")
    # internal: one measurement
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", type=str, default="naive", help=argparse.SUPPRESS)
    ap.add_argument("--mode", type=str, default="inference", help=argparse.SUPPRESS)
    ap.add_argument("--chunk-size", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    from deepretrieval.workers.logprob import auto_chunk_size

    T = args.prompt_len + args.response_len
    full_logits_mb = args.batch * T * args.vocab * 4 / 2**20
    print(f"batch={args.batch} prompt={args.prompt_len} response={args.response_len} vocab={args.vocab} "
          f"hidden={args.hidden} layers={args.layers} device={args.device} threads={args.threads}")
    print(f"full [B,T,V] float32 logits = {full_logits_mb:.0f} MB")
    base = [sys.executable, __file__, "--worker"] + [
        f"--vocab={args.vocab}", f"--hidden={args.hidden}", f"--layers={args.layers}", f"--batch={args.batch}",
        f"--prompt-len={args.prompt_len}", f"--response-len={args.response_len}", f"--threads={args.threads}",
        f"--device={args.device}"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    chunks = [int(c) for c in args.chunk_sizes.split(",") if c]
    print(f"{'mode':<10} {'path':<20} {'peak MB':>9} {'seconds':>8} {'naive/this':>10}")
    for mode in ("inference", "train"):
        results = []
        for path, chunk in [("naive", 0)] + [("chunked", c) for c in chunks]:
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run(base + [f"--path={path}", f"--mode={mode}", f"--chunk-size={chunk}"],
                                     capture_output=True, text=True, env=env, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            runs.sort(key=lambda r: r["peak_mb"])
            results.append(runs[len(runs) // 2])
        naive = results[0]["peak_mb"]
        for r in results:
            size = r["chunk_size"] or f"auto={auto_chunk_size(args.vocab)}"
            label = r["path"] if r["path"] == "naive" else f"chunked({size})"
            print(f"{mode:<10} {label:<20} {r['peak_mb']:>9.1f} {r['seconds']:>8.2f} {naive / r['peak_mb']:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
