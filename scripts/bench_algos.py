#!/usr/bin/env python
"""Benchmarks for the Batch protocol and the advantage estimators (CPU; figures are ratios measured
in the same run, so they compare like with like on whatever machine runs this).

    python scripts/bench_algos.py [--batch 1024] [--resp 512] [--repeats 5] [--threads 1]

1. Batch pickling: bytes and seconds of ``pickle.dumps(batch)`` against the raw tensor bytes and
   against pickling the same tensors as a plain dict; a 1/100 slice against a plain TensorDict slice
   (which drags its whole parent storage along).
2. GAE (vectorised over the batch, loop over tokens) against a per-sample Python-loop reference.
3. GRPO (scatter-based group statistics) against a per-sample dict-of-lists reference.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time

import torch


from deepretrieval.algorithms import core_algos as ca
from deepretrieval.protocol import Batch


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def loop_gae(rewards, values, mask, gamma, lam):
    out = []
    for r_row, v_row, m_row in zip(rewards.tolist(), values.tolist(), mask.tolist()):
        idx = [t for t, m in enumerate(m_row) if m]
        row = [0.0] * len(r_row)
        gae = 0.0
        for k in range(len(idx) - 1, -1, -1):
            t = idx[k]
            v_next = v_row[idx[k + 1]] if k + 1 < len(idx) else 0.0
            gae = r_row[t] + gamma * v_next - v_row[t] + gamma * lam * gae
            row[t] = gae
        out.append(row)
    return out


def loop_grpo(scores, index):
    groups: dict = {}
    for s, i in zip(scores, index):
        groups.setdefault(i, []).append(s)
    out = []
    for s, i in zip(scores, index):
        g = groups[i]
        mu, sd = (statistics.mean(g), statistics.stdev(g)) if len(g) > 1 else (0.0, 1.0)
        out.append((s - mu) / (sd + 1e-6))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--resp", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 keeps figures stable on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, length = args.batch, args.resp
    gen = torch.Generator().manual_seed(0)

    tensors = {
        "input_ids": torch.randint(0, 32000, (n, length), generator=gen),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "old_log_probs": torch.randn(n, length, generator=gen),
        "advantages": torch.randn(n, length, generator=gen),
    }
    batch = Batch.from_dict(tensors, {"uid": [f"uid-{i // 8}" for i in range(n)]}, {"temperature": 1.0})
    raw = batch.nbytes()
    blob = pickle.dumps(batch)
    t_batch = best_of(lambda: pickle.loads(pickle.dumps(batch)), args.repeats)
    t_dict = best_of(lambda: pickle.loads(pickle.dumps(tensors)), args.repeats)
    sl = batch[: n // 100]
    slice_bytes = len(pickle.dumps(sl))
    naive_slice_bytes = len(pickle.dumps(batch.batch[: n // 100]))
    print(f"[pickle] batch {n}x{length}: raw tensor bytes {raw / 1e6:.1f} MB, pickled {len(blob) / 1e6:.1f} MB "
          f"(ratio {len(blob) / raw:.4f}); round trip {t_batch * 1e3:.1f} ms vs plain dict of tensors "
          f"{t_dict * 1e3:.1f} ms (ratio {t_batch / t_dict:.2f})")
    print(f"[pickle] 1/100 slice: {slice_bytes / 1e6:.2f} MB vs plain TensorDict slice "
          f"{naive_slice_bytes / 1e6:.2f} MB (ratio {naive_slice_bytes / slice_bytes:.1f}x smaller)")

    rewards = torch.zeros(n, length)
    lengths = torch.randint(1, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    rewards[torch.arange(n), lengths - 1] = torch.rand(n, generator=gen)
    values = torch.randn(n, length, generator=gen)
    t_vec = best_of(lambda: ca.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95), args.repeats)
    t_loop = best_of(lambda: loop_gae(rewards, values, mask, 0.99, 0.95), 1)
    print(f"[gae] {n}x{length}: vectorised {t_vec * 1e3:.1f} ms, per-sample loop {t_loop * 1e3:.0f} ms "
          f"(speed-up {t_loop / t_vec:.0f}x)")

    index = [f"uid-{i // 8}" for i in range(n)]
    t_vec = best_of(lambda: ca.compute_grpo_outcome_advantage(rewards, mask, index), args.repeats)
    scores = rewards.sum(-1).tolist()
    t_loop = best_of(lambda: loop_grpo(scores, index), args.repeats)
    print(f"[grpo] {n}x{length}, groups of 8: vectorised {t_vec * 1e3:.1f} ms (incl. broadcast to tokens), "
          f"dict loop on scores only {t_loop * 1e3:.1f} ms (ratio {t_loop / t_vec:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
