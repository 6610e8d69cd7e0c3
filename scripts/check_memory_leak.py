#!/usr/bin/env python
"""Leak check: a CPU PPO run on Ray (tiny Qwen2, pubmed_mini, 2 FSDP2 workers) records the resident
set size of the driver and of every worker process after each step, and fits a line to each series
after a warm-up. A leak shows as a steady slope; the verdict is "no steady growth" when every
series grows by less than `--max-growth-mb` over the measured steps (slope x steps).

    PYTHONPATH=code python scripts/check_memory_leak.py                 # 50 steps, GRPO
    PYTHONPATH=code python scripts/check_memory_leak.py --steps 20 --out rss.json

Worker RSS is read with psutil by pid (the workers run on this machine); the figure for the
project is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List


def slope(ys: List[float]) -> float:
    """Least-squares slope of `ys` against 0..n-1 (per step)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx = (n - 1) / 2
    my = sum(ys) / n
    num = sum((i - mx) * (y - my) for i, y in enumerate(ys))
    den = sum((i - mx) ** 2 for i in range(n))
    return num / den


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the fit (allocator warm-up)")
    ap.add_argument("--max-growth-mb", type=float, default=50.0)
    ap.add_argument("--out", type=Path, default=None, help="write the per-step series as JSON")
    args = ap.parse_args()
    import psutil

    from deepretrieval.data.tasks import prepare_task
    from deepretrieval.models.tiny import save_tiny_model
    from deepretrieval.trainer.config import compose_config
    from deepretrieval.trainer import ppo_trainer
    from deepretrieval.trainer.ppo_trainer import PPOTrainer

    work = Path(tempfile.mkdtemp(prefix="leakcheck-"))
    paths = prepare_task("pubmed_mini", work / "data", seed=42, val_size=4)
    model = save_tiny_model(work / "model", hidden_size=64, num_layers=2)
    overrides = {
        "data.train_files": paths["train"], "data.val_files": "null", "data.train_batch_size": 4,
        "data.max_prompt_length": 384, "data.max_response_length": 16, "actor_rollout_ref.model.path": model,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 2, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 2,
        "actor_rollout_ref.rollout.n": 2, "algorithm.adv_estimator": "grpo", "trainer.device": "cpu",
        "trainer.n_gpus_per_node": 2, "trainer.total_training_steps": args.steps, "trainer.save_freq": 0,
        "trainer.val_before_train": False, "trainer.logger": "[jsonl]", "trainer.default_local_dir": str(work / "run"),
        "trainer.ray_init.num_cpus": 2,
    }
    config = compose_config([f"{k}={v}" for k, v in overrides.items()])
    trainer = PPOTrainer(config)
    driver = psutil.Process()
    series: Dict[str, List[float]] = {"driver": []}
    times: List[float] = []
    original = ppo_trainer.ppo_step

    def step(*args):
        out = original(*args)
        series["driver"].append(driver.memory_info().rss / 2**20)
        for w in trainer.worker_info():
            name = f"{w['group']}_rank{w['rank']}"
            try:
                rss = psutil.Process(w["pid"]).memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                rss = float("nan")
            series.setdefault(name, []).append(rss)
        times.append(time.perf_counter())
        print(f"step {len(times)}: " + ", ".join(f"{k} {v[-1]:.0f} MB" for k, v in series.items()), flush=True)
        return out

    ppo_trainer.ppo_step = step
    start = time.perf_counter()
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    wall = time.perf_counter() - start
    report = {"steps": len(times), "warmup": args.warmup, "wall_s": round(wall, 1), "series": {}}
    ok = True
    for name, ys in series.items():
        measured = ys[args.warmup:]
        s = slope(measured)
        growth = s * max(len(measured) - 1, 0)
        ok &= growth < args.max_growth_mb
        report["series"][name] = {"first_mb": round(ys[0], 1), "after_warmup_mb": round(measured[0], 1) if measured else None,
                                  "last_mb": round(ys[-1], 1), "max_mb": round(max(ys), 1),
                                  "slope_mb_per_step": round(s, 3), "fitted_growth_mb": round(growth, 1)}
    report["verdict"] = "no steady growth" if ok else f"growth over {args.max_growth_mb} MB: possible leak"
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"report": report, "rss_mb": series}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
