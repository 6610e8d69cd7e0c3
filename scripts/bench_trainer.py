"""Benchmark of the PPO trainer on CPU: in-process (1 worker) vs Ray with FSDP2 (2 workers).

Both runs train the same tiny Qwen2 on pubmed_mini prompts with the local engine as reward, for
`--steps` steps; the script prints start-up time, the mean step time and its phases (first step
excluded: it includes lazy initialisation), tokens/s, peak worker memory, and the ratios
Ray/in-process measured in this same run.

    python scripts/bench_trainer.py --steps 6 --response-length 32 --hidden 64

With `--shape tiny|0.5b|3b` it instead times the worker-level phases of one PPO step (issue 7) on a
Qwen2.5-shaped model with random weights: generation (HF rollout), old log-probs, reference, values,
critic and actor updates, each with padded and with packed (`use_remove_padding`) forwards, and prints
per-phase seconds, tokens/s, the packed/padded ratios measured in the same run and, with
`--peak-tflops`, MFU = (2 N tokens for forward-only passes, 6 N tokens for updates) / time / peak.
Responses are cut at random lengths after generation ("simulated EOS": random weights rarely stop),
so the padding is what a real rollout has.

    python scripts/bench_trainer.py --shape tiny --batch 16 --prompt-length 128 --response-length 64
    python scripts/bench_trainer.py --shape 0.5b --device cuda --batch 64 --prompt-length 256 \
        --response-length 256 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))


def run(label: str, overrides: list, out: Path) -> dict:
    from deepretrieval.trainer.config import compose_config
    from deepretrieval.trainer.ppo_trainer import PPOTrainer

    cfg = compose_config(overrides + [f"trainer.default_local_dir={out}"])
    start = time.perf_counter()
    trainer = PPOTrainer(cfg, console_write=lambda s: None)
    try:
        trainer.init_workers()
        startup = time.perf_counter() - start
        trainer.fit()
    finally:
        trainer.shutdown()
    rows = [json.loads(line) for line in open(out / "logs" / "metrics.jsonl")]
    steps = [r for r in rows if "timing/step" in r][1:]
    phases = ("gen", "reward", "old_log_prob", "ref", "values", "update_critic", "update_actor", "step")
    result = {"label": label, "startup_s": startup}
    for p in phases:
        result[p] = float(np.mean([r.get(f"timing/{p}", 0.0) for r in steps]))
    result["tokens_per_s"] = float(np.mean([r["perf/throughput"] for r in steps]))
    result["peak_rss_gb"] = max(r.get("perf/max_memory_rss_gb", 0.0) for r in steps)
    return result


# Qwen2.5 shapes (config.json of the released models); weights are random
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936),
}


def make_shape(shape: str, dtype, device, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0):
    """Left-padded random prompts with lengths uniform in [prompt_len/4, prompt_len]."""
    import torch

    from deepretrieval.protocol import Batch

    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, prompt_len // 4), prompt_len + 1, (batch,), generator=gen)
    ids = torch.randint(2, vocab, (batch, prompt_len), generator=gen)
    mask = (torch.arange(prompt_len)[None, :] >= (prompt_len - lens)[:, None]).long()
    ids = ids * mask  # pad id 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch.from_dict({"input_ids": ids, "attention_mask": mask, "position_ids": pos}, meta_info={"seed": seed})


def simulate_eos(batch, seed: int = 1):
    """Cut every response at a random length in [1, R] (mask, ids and attention mask)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    resp = batch.batch["responses"]
    n, r = resp.shape
    keep = torch.randint(1, r + 1, (n,), generator=gen)
    m = (torch.arange(r)[None, :] < keep[:, None]).long()
    p = batch.batch["prompts"].shape[-1]
    batch.batch["response_mask"] = m
    batch.batch["responses"] = resp * m
    batch.batch["input_ids"][:, p:] = batch.batch["responses"]
    batch.batch["attention_mask"][:, p:] = m
    return batch


def bench_phases(args) -> int:
    import torch

    from deepretrieval.workers.actor import Actor, enable_gradient_checkpointing
    from deepretrieval.workers.critic import Critic, ValueModel
    from deepretrieval.workers.reference import Reference, frozen_copy
    from deepretrieval.workers.rollout.hf import HFRollout

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = make_shape(args.shape, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())  # tied head counted once (its matmul)
    vocab = model.config.vocab_size
    tok = type("Tok", (), {"eos_token_id": 1, "pad_token_id": 0})()
    prompts = random_prompts(args.batch, args.prompt_length, vocab).to(device)
    rollout = HFRollout(model, tok, {"response_length": args.response_length, "n": 1, "temperature": 1.0})
    timings, tokens = {}, {}

    def timed(name, fn, n_tokens, repeats=None):
        """Median of `repeats` runs after one untimed warm-up (lazy initialisation, allocator)."""
        repeats = args.repeats if repeats is None else repeats
        out = fn() if repeats > 1 else None
        times = []
        for _ in range(max(1, repeats)):
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - start)
        timings[name] = float(np.median(times))
        tokens[name] = n_tokens
        return out

    gen_tokens = args.batch * args.response_length
    batch = timed("gen", lambda: rollout.generate_sequences(prompts), gen_tokens, repeats=1)
    batch = simulate_eos(batch.to("cpu")).to(device)
    valid = int(batch.batch["attention_mask"].sum())
    padded = batch.batch["attention_mask"].numel()
    batch.batch["advantages"] = torch.randn(batch.batch["responses"].shape, device=device)
    batch.batch["returns"] = torch.randn(batch.batch["responses"].shape, device=device)
    mb = args.micro_batch
    for rmpad in (False, True):
        tag = "packed" if rmpad else "padded"
        torch.manual_seed(0)
        actor_model = make_shape(args.shape, dtype, device)
        if args.grad_ckpt:
            enable_gradient_checkpointing(actor_model)
        actor = Actor(actor_model, {"ppo_mini_batch_size": args.batch, "ppo_micro_batch_size_per_gpu": mb,
                                    "log_prob_micro_batch_size_per_gpu": mb, "use_remove_padding": rmpad,
                                    "grad_clip": 1.0, "optim": {"lr": 1e-6}})
        ref = Reference(frozen_copy(actor_model), {"log_prob_micro_batch_size_per_gpu": mb, "use_remove_padding": rmpad})
        critic = Critic(ValueModel(make_shape(args.shape, dtype, device).get_decoder()),
                        {"ppo_mini_batch_size": args.batch, "ppo_micro_batch_size_per_gpu": mb,
                         "use_remove_padding": rmpad, "grad_clip": 1.0, "optim": {"lr": 1e-6}})
        lp, _ = timed(f"old_log_prob/{tag}", lambda: actor.compute_log_prob(batch), valid)  # noqa: B023, F821 (called at once)
        batch.batch["old_log_probs"] = lp
        timed(f"ref/{tag}", lambda: ref.compute_ref_log_prob(batch), valid)  # noqa: B023, F821 (called at once)
        batch.batch["values"] = timed(f"values/{tag}", lambda: critic.compute_values(batch), valid)  # noqa: B023, F821 (called at once)
        timed(f"update_critic/{tag}", lambda: critic.update_critic(batch), valid)  # noqa: B023, F821 (called at once)
        timed(f"update_actor/{tag}", lambda: actor.update_policy(batch), valid)  # noqa: B023, F821 (called at once)
        del actor, ref, critic, actor_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"timings: median of {args.repeats} runs after a warm-up (generation: one run)")
    print(f"shape={args.shape} params={n_params / 1e6:.1f}M device={device} dtype={args.dtype} "
          f"batch={args.batch} prompt<={args.prompt_length} response<={args.response_length} "
          f"valid tokens={valid} of {padded} padded ({valid / padded:.0%})")
    print("| phase | padded s | packed s | packed/padded time | tokens/s (packed) | MFU packed |")
    print("|---|---|---|---|---|---|")
    print(f"| gen (HF rollout) | {timings['gen']:.3f} | | | {gen_tokens / timings['gen']:.0f} | |")
    for phase, flops_per_token in (("old_log_prob", 2), ("ref", 2), ("values", 2), ("update_critic", 6),
                                   ("update_actor", 6)):
        a, b = timings[f"{phase}/padded"], timings[f"{phase}/packed"]
        mfu = ""
        if args.peak_tflops:
            mfu = f"{flops_per_token * n_params * valid / b / (args.peak_tflops * 1e12):.1%}"
        print(f"| {phase} | {a:.3f} | {b:.3f} | {b / a:.2f} | {valid / b:.0f} | {mfu} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="prompts per step")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="time the worker phases on a Qwen2.5-shaped random model instead of the trainer runs")
    parser.add_argument("--prompt-length", type=int, default=128, help="(--shape) longest prompt")
    parser.add_argument("--micro-batch", type=int, default=4, help="(--shape) samples per forward")
    parser.add_argument("--repeats", type=int, default=3, help="(--shape) timed runs per phase (median), after a warm-up")
    parser.add_argument("--device", default="cpu", help="(--shape) cpu | cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="(--shape) model precision")
    parser.add_argument("--grad-ckpt", action="store_true", help="(--shape) activation checkpointing in updates")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="(--shape) the device's peak TFLOP/s for MFU (e.g. 989 for H100/H200 bf16 dense)")
    args = parser.parse_args()
    if args.shape:
        return bench_phases(args)

    from deepretrieval.data.tasks import prepare_task
    from deepretrieval.models.tiny import save_tiny_model
    from deepretrieval.search.local_index import build_index

    tmp = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    paths = prepare_task("pubmed_mini", tmp / "data", seed=42, val_size=4)
    model = save_tiny_model(tmp / "model", hidden_size=args.hidden, num_layers=2)
    build_index(ROOT / "data" / "pubmed_mini" / "corpus.jsonl.gz", tmp / "index", progress=False)
    common = [
        f"data.train_files={paths['train']}", "data.val_files=null",
        f"data.train_batch_size={args.batch}", "data.max_prompt_length=384",
        f"data.max_response_length={args.response_length}", f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "critic.ppo_micro_batch_size_per_gpu=2",
        f"reward.sources.pubmed_mini.index_dir={tmp / 'index'}", "trainer.device=cpu",
        "trainer.logger=[jsonl]", f"trainer.total_training_steps={args.steps}", "trainer.save_freq=0",
        "trainer.val_before_train=false", "trainer.resume_mode=disable", "trainer.ray_init.num_cpus=2",
    ]
    local = run("in-process, 1 worker", common + ["trainer.n_gpus_per_node=1", "trainer.use_ray=false"], tmp / "local")
    ray = run("Ray + FSDP2, 2 workers", common + ["trainer.n_gpus_per_node=2"], tmp / "ray")
    keys = ["startup_s", "gen", "reward", "old_log_prob", "ref", "values", "update_critic", "update_actor", "step",
            "tokens_per_s", "peak_rss_gb"]
    print(f"| metric | {local['label']} | {ray['label']} | ratio (Ray / in-process) |")
    print("|---|---|---|---|")
    for k in keys:
        a, b = local[k], ray[k]
        ratio = b / a if a else float("nan")
        print(f"| {k} | {a:.3f} | {b:.3f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
