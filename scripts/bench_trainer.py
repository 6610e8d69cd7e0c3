"""Benchmark of the PPO trainer on CPU: in-process (1 worker) vs Ray with FSDP2 (2 workers).

Both runs train the same tiny Qwen2 on pubmed_mini prompts with the local engine as reward, for
`--steps` steps; the script prints start-up time, the mean step time and its phases (first step
excluded: it includes lazy initialisation), tokens/s, peak worker memory, and the ratios
Ray/in-process measured in this same run.

    python scripts/bench_trainer.py --steps 6 --response-length 32 --hidden 64
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="prompts per step")
    args = parser.parse_args()

    from deepretrieval.data.tasks import prepare_task
    from deepretrieval.models.tiny import save_tiny_model
    from deepretrieval.search.local import build_index

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
