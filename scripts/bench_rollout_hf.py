#!/usr/bin/env python
"""Generation speed of HFRollout and its `rollout.hf` options vs `transformers` `model.generate`.

One run, one random-weight Qwen2, the same left-padded prompts and sampling settings (temperature 1,
no top-k / top-p) for every method; prints tokens/s of each and its ratio to `model.generate`, all
measured in this run. Tokens = response tokens through the first EOS (what a rollout returns), so
padding after a row has finished is not counted for anybody.

Methods:
  generate          model.generate (num_return_sequences = n)
  loop              HFRollout as it was before the options: n prompt copies prefilled, dynamic cache
  shared            + shared_prefill (each prompt prefilled once, KV rows copied to its n samples)
  compact<k>        + compact_every=k (finished rows dropped from the batch every k steps)
  static            + cache=static (preallocated StaticCache, eager)
  static+compact<k> + both
  compiled          + cache=static, compile=true (CUDA graphs on GPU, inductor on CPU)
  compiled+compact<k>
  cb                transformers continuous batching (model.generate_batch); its sampler uses the global
                    RNG in a background thread, so it is a comparison here, not an HFRollout option

Workloads:
  full      no row stops (a random model practically never emits the EOS): every method decodes R steps
  longtail  EOS = a random 1/L-th of the vocabulary (L = --mean-len): response lengths are about
            geometric with mean L, cut at R, so most rows finish early and a few run to R

    python scripts/bench_rollout_hf.py                                     # CPU, tiny model, a few minutes
    python scripts/bench_rollout_hf.py --device cuda --shape qwen2.5-0.5b  # the GPU figures, one command
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


# Qwen2.5-0.5B(-Instruct) architecture; random weights, nothing is downloaded
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)

CPU_METHODS = "generate,loop,shared,compact1,compact4,compact16,static,static+compact4,compiled,cb"
# The GPU default is the goal's workload (no row stops, so compaction has nothing to do). Long tails on GPU:
#   --workloads longtail --methods generate,loop,shared,compact4,static+compact4,compiled,compiled+compact4
GPU_METHODS = "generate,loop,shared,static,compiled,cb"


def build_model(args, tok, torch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from deepretrieval.models.tiny import make_tiny_qwen2

    dtype = {"auto": torch.bfloat16 if args.device == "cuda" else torch.float32, "bf16": torch.bfloat16,
             "fp32": torch.float32}[args.dtype]
    if args.shape == "tiny":
        model = make_tiny_qwen2(tok, hidden_size=args.hidden, num_layers=args.layers)
    else:
        config = Qwen2Config(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, **QWEN25_05B)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = Qwen2ForCausalLM(config)
    return model.to(device=args.device, dtype=dtype).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "qwen2.5-0.5b"])
    ap.add_argument("--hidden", type=int, default=256, help="tiny shape: hidden size")
    ap.add_argument("--layers", type=int, default=2, help="tiny shape: layers")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--batch", type=int, default=None, help="prompts (default: 8 on cpu, 32 on cuda)")
    ap.add_argument("--n", type=int, default=None, help="samples per prompt (default: 4 on cpu, 8 on cuda)")
    ap.add_argument("--response-len", type=int, default=None, help="R (default: 64 on cpu, 256 on cuda)")
    ap.add_argument("--mean-len", type=int, default=None, help="longtail: mean response length (default R / 4)")
    ap.add_argument("--prompt-len", type=int, default=None,
                    help="left-pad prompts to this width, as the dataset pads to data.max_prompt_length "
                         "(default: the longest prompt)")
    ap.add_argument("--workloads", default=None, help="comma list (default: full,longtail on cpu; full on cuda)")
    ap.add_argument("--methods", default=None, help=f"comma list (cpu default {CPU_METHODS}; cuda default {GPU_METHODS})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls after the first (default 3 cpu, 1 cuda)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--warm-compile-cache", action="store_true",
                    help="reuse inductor's on-disk cache (default: a fresh one, so 'first call' is an honest compile time)")
    args = ap.parse_args()
    if not args.warm_compile_cache:
        import os
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")  # before torch loads
    gpu = args.device == "cuda"
    args.batch = args.batch or (32 if gpu else 8)
    args.n = args.n or (8 if gpu else 4)
    args.response_len = args.response_len or (256 if gpu else 64)
    args.mean_len = args.mean_len or max(1, args.response_len // 4)
    args.repeats = args.repeats or (1 if gpu else 3)
    args.workloads = args.workloads or ("full" if gpu else "full,longtail")
    methods = (args.methods or (GPU_METHODS if gpu else CPU_METHODS)).split(",")

    import torch
    from transformers import GenerationConfig

    from deepretrieval.models.tiny import load_tiny_tokenizer, make_prompt_batch
    from deepretrieval.protocol import Batch
    from deepretrieval.workers.config import RolloutConfig, from_dict
    from deepretrieval.workers.rollout import HFRollout
    from deepretrieval.workers.rollout.base import response_mask_from_eos

    torch.set_num_threads(args.threads)
    tok = load_tiny_tokenizer()
    model = build_model(args, tok, torch)
    vocab = model.config.vocab_size
    texts = [f"Find randomized trials of drug {i} for {'chronic ' * (i % 5)}heart failure" for i in range(args.batch)]
    prompts = make_prompt_batch(tok, texts)
    if args.prompt_len:
        width = prompts.batch["input_ids"].shape[1]
        if args.prompt_len < width:
            raise SystemExit(f"--prompt-len {args.prompt_len} < longest prompt ({width} tokens)")
        extra = args.prompt_len - width
        pad = {"input_ids": tok.pad_token_id, "attention_mask": 0, "position_ids": 0}
        prompts = Batch.from_dict({key: torch.cat([torch.full((len(prompts), extra), value, dtype=prompts.batch[key].dtype),
                                                   prompts.batch[key]], -1) for key, value in pad.items()})
    prompts = prompts.to(args.device)
    P, R, n = prompts.batch["input_ids"].shape[1], args.response_len, args.n
    print(f"device={args.device} shape={args.shape} params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"dtype={next(model.parameters()).dtype} prompts={args.batch} n={n} rows={args.batch * n} prompt_len={P} "
          f"R={R} threads={args.threads} torch={torch.__version__}")

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def rollout_method(eos, hf):
        cfg = {"response_length": R, "n": n, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "hf": hf}
        rollout = HFRollout(model, tok, from_dict(RolloutConfig, cfg))
        rollout.eos_ids = eos
        calls = iter(range(10 ** 6))

        def run():
            prompts.meta_info["seed"] = next(calls)  # a fresh seed per call, as the trainer gives
            return int(rollout.generate_sequences(prompts).batch["response_mask"].sum())
        return run

    def generate_method(eos):
        gen_cfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=R,
                                   num_return_sequences=n, pad_token_id=tok.pad_token_id, eos_token_id=eos)

        def run():
            with torch.no_grad():
                out = model.generate(input_ids=prompts.batch["input_ids"], attention_mask=prompts.batch["attention_mask"],
                                     generation_config=gen_cfg)
            return int(response_mask_from_eos(out[:, P:], eos).sum())
        return run

    def cb_method(eos):
        ids, mask = prompts.batch["input_ids"].cpu(), prompts.batch["attention_mask"].cpu().bool()
        inputs = [row[m].tolist() for row, m in zip(ids, mask)]
        gen_cfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=R,
                                   num_return_sequences=n, pad_token_id=tok.pad_token_id, eos_token_id=eos)

        def run():
            out = model.generate_batch(inputs=inputs, generation_config=gen_cfg, progress_bar=False)
            return sum(int(response_mask_from_eos(torch.tensor([o.generated_tokens]), eos).sum()) for o in out.values())
        return run

    def timed(fn):
        sync()
        start = time.perf_counter()
        tokens = fn()
        sync()
        return time.perf_counter() - start, tokens

    def make(name, eos):
        if name == "generate":
            return generate_method(eos)
        if name == "cb":
            return cb_method(eos)
        hf = {"shared_prefill": name != "loop", "compact_every": 0, "cache": "dynamic", "compile": False}
        base, _, compact = name.partition("+")
        if base.startswith("compact"):
            base, compact = "", base
        if base in ("static", "compiled"):
            hf["cache"] = "static"
        if base == "compiled":
            hf["compile"] = True
        if compact:
            hf["compact_every"] = int(compact[len("compact"):])
        if base not in ("", "loop", "shared", "static", "compiled"):
            raise SystemExit(f"unknown method {name!r}")
        return rollout_method(eos, hf)

    results = []
    for workload in args.workloads.split(","):
        if workload == "full":
            eos = [tok.eos_token_id]
        elif workload == "longtail":
            g = torch.Generator().manual_seed(0)
            eos = torch.randperm(vocab, generator=g)[: max(1, vocab // args.mean_len)].tolist()
        else:
            raise SystemExit(f"unknown workload {workload!r}")
        print(f"\n[{workload}] " + ("no row stops" if workload == "full" else
                                   f"{len(eos)} EOS ids = 1/{args.mean_len} of the vocabulary"))
        fns, first = {}, {}
        for name in methods:  # first call: warm-up, and compilation for the compiled methods
            try:
                fns[name] = make(name, eos)
                first[name] = timed(fns[name])[0]
                print(f"  {name}: first call {first[name]:.2f} s", flush=True)
            except Exception as exc:  # one broken method (e.g. cb on an old transformers) must not end the run
                print(f"{name:<22} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
                fns.pop(name, None)
        # timed calls round-robin, so load changes on a shared machine hit every method alike
        runs = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                runs[name].append(timed(fn))
        fns.clear()
        rows = []
        for name, calls in runs.items():
            rows.append({"workload": workload, "method": name, "first_call_s": first[name],
                         "median_s": statistics.median(sec for sec, _ in calls),
                         "tokens": int(statistics.median(tok_ for _, tok_ in calls)),
                         "tokens_per_s": statistics.median(tok_ / sec for sec, tok_ in calls)})
        ref = next((r["tokens_per_s"] for r in rows if r["method"] == "generate"), None)
        print(f"{'method':<22}{'first call s':>13}{'median s':>10}{'tokens':>9}{'tokens/s':>11}{'x generate':>11}")
        for r in rows:
            r["x_generate"] = r["tokens_per_s"] / ref if ref else None
            ratio = f"{r['x_generate']:.2f}" if ref else "-"
            print(f"{r['method']:<22}{r['first_call_s']:>13.2f}{r['median_s']:>10.3f}{r['tokens']:>9}"
                  f"{r['tokens_per_s']:>11.0f}{ratio:>11}")
        if rows and workload == "longtail":
            mean = statistics.mean(r["tokens"] for r in rows) / (args.batch * n)
            print(f"(mean response length {mean:.1f} of R={R}; tokens = median per call)")
        results.extend(rows)
        if args.json:  # after every workload, so a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
