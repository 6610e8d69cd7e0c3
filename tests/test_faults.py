"""Faults on a real (local) Ray run of the CPU recipe: a worker process killed by pid mid-step or
during a checkpoint save, with and without `trainer.max_restarts`; the driver interrupted by
SIGTERM (no orphan processes, the rerun resumes); the search service down for a while
(`search_unavailable` samples left out, all-unavailable steps skipped and counted, K in a row stop
the run)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepretrieval.search.fakes import Fault, FakePubMedServer
from deepretrieval.trainer.checkpoint import verify
from deepretrieval.trainer.main_ppo import main
from trainer_helpers import make_assets, overrides, read_metrics, scripted_rollout, stable, words_query

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, pubmed_mini_index):
    return make_assets(tmp_path_factory.mktemp("faults"), pubmed_mini_index)


def ray_args(assets, out, **extra):
    # GRPO: no critic, so 2 worker processes (the actor group's) instead of 4
    common = {"algorithm.adv_estimator": "grpo", "trainer.n_gpus_per_node": 2, "trainer.total_training_steps": 3,
              "trainer.save_freq": 1,
              "trainer.val_before_train": False, "trainer.save_hf_model": False, "data.val_files": "null"}
    common.update(extra)
    return overrides(assets, out, **common)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


class Killer:
    """Kills `group` rank `rank` (SIGKILL, by pid) when the trainer makes the `nth` call of `method`
    (counted over the whole test, restarts included): the other rank receives its share of the call
    and blocks in it, the killed one never answers."""

    def __init__(self, monkeypatch, plan):
        from deepretrieval.controller.worker_group import RayWorkerGroup

        self.plan = {(m, n): (g, r) for m, n, g, r in plan}
        self.counts, self.killed = {}, []
        original = RayWorkerGroup._run
        killer = self

        def run(group, method, per_args, per_kwargs):
            n = killer.counts[(group.name_prefix, method)] = killer.counts.get((group.name_prefix, method), 0) + 1
            target = killer.plan.get((method, n))
            if target and target[0] == group.name_prefix:
                pid = group.worker_info[target[1]]["pid"]
                os.kill(pid, signal.SIGKILL)
                killer.killed.append((method, n, pid, time.monotonic()))
            return original(group, method, per_args, per_kwargs)

        monkeypatch.setattr(RayWorkerGroup, "_run", run)


def test_worker_killed_mid_step_without_restarts_stops_cleanly(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    killer = Killer(monkeypatch, [("compute_log_prob", 2, "actor_rollout_ref", 1)])  # step 2, after generation
    start = time.monotonic()
    rc = main(ray_args(assets, out, **{"trainer.call_timeout_s": 600, "trainer.total_training_steps": 2}))
    assert rc == 1
    (method, n, pid, when), = killer.killed
    # noticed within seconds, not after the 600 s call timeout (the bound includes the teardown)
    print(f"kill -> main() returned: {time.monotonic() - when:.1f} s")
    assert time.monotonic() - when < 120, time.monotonic() - when
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training failed")]
    assert len(err) == 1, err
    line = err[0]
    for part in ("step 2 (training)", "actor_rollout_ref.compute_log_prob", "rank 1", f"pid {pid}", "died",
                 "trainer.max_restarts=0", "global_step_1"):
        assert part in line, (part, line)
    verify(out / "global_step_1")  # the last complete checkpoint is intact ...
    assert not (out / "global_step_2").exists()  # ... and nothing newer claims to be one
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp_")]
    assert time.monotonic() - start < 900


@pytest.mark.slow  # ~3 Ray runs; measured in docs/reliability.md
def test_restarts_resume_and_match_an_uninterrupted_run(assets, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert main(ray_args(assets, straight)) == 0
    healed = tmp_path / "healed"
    # step 2 dies after generation; after the restart (from global_step_1) step 2 runs again and its
    # checkpoint save loses a worker mid-save; the second restart (from global_step_1 again) finishes
    killer = Killer(monkeypatch, [("compute_log_prob", 2, "actor_rollout_ref", 1),
                                  ("save_checkpoint", 2, "actor_rollout_ref", 1)])
    assert main(ray_args(assets, healed, **{"trainer.max_restarts": 2})) == 0
    assert [k[:2] for k in killer.killed] == [("compute_log_prob", 2), ("save_checkpoint", 2)]
    a, _ = read_metrics(straight)
    b, rows = read_metrics(healed)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert b[3]["train/worker_restarts"] == 2.0 and a[3]["train/worker_restarts"] == 0.0
    for step in (1, 2, 3):
        x = {k: v for k, v in stable(a[step]).items() if k != "train/worker_restarts"}
        y = {k: v for k, v in stable(b[step]).items() if k != "train/worker_restarts"}
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-7), (step, key)
    for step in (1, 2, 3):
        verify(healed / f"global_step_{step}")
    assert not [p for p in healed.iterdir() if p.name.startswith((".tmp_", ".trash_"))]
    import torch
    from torch.distributed.checkpoint import FileSystemReader  # noqa: F401  (DCP shards exist)

    sa = torch.load(straight / "global_step_3" / "trainer_state.pt", weights_only=False)
    sb = torch.load(healed / "global_step_3" / "trainer_state.pt", weights_only=False)
    assert sa["loader"] == sb["loader"] and sa["global_step"] == sb["global_step"] == 3


# ------------------------------------------------------------------------------ driver signals

def _child_pids(pid):
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow  # two trainer subprocesses; time in docs/reliability.md
def test_sigterm_releases_workers_and_rerun_resumes(assets, tmp_path):
    out = tmp_path / "run"
    args = ray_args(assets, out, **{"trainer.total_training_steps": 50})
    env = dict(os.environ, PYTHONPATH=str(ROOT / "code"))
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "deepretrieval.trainer.main_ppo", *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path), start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None and not (out / "global_step_1").is_dir():
            time.sleep(0.5)
        assert (out / "global_step_1").is_dir(), (tmp_path / "log.txt").read_text()[-3000:]
        text = (tmp_path / "log.txt").read_text()
        import re

        workers = [int(p) for p in re.findall(r"rank \d: pid (\d+)", text)]
        assert len(workers) == 2, text[-2000:]  # the actor group's 2 ranks
        children = set(_child_pids(proc.pid)) | set(workers)  # raylet, GCS, workers, ...
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    assert rc == 130
    assert _wait_gone(sorted(children), 60) == [], "orphan processes after SIGTERM"
    done = max(int(p.name.split("_")[-1]) for p in out.glob("global_step_*"))
    # the same command (with a nearer end) resumes from the last complete checkpoint
    args = ray_args(assets, out, **{"trainer.total_training_steps": done + 1})
    assert subprocess.run([sys.executable, "-m", "deepretrieval.trainer.main_ppo", *args], env=env,
                          cwd=str(tmp_path), timeout=600, capture_output=True).returncode == 0
    steps, rows = read_metrics(out)
    assert done + 1 in steps
    state = json.loads((out / f"global_step_{done + 1}" / "COMPLETE.json").read_text())
    assert state["step"] == done + 1


# ------------------------------------------------------------------------------ search service down

class FlakyPubMed(FakePubMedServer):
    """The fake esearch, answering 503 to every request while `down` is set."""

    down = False

    def _take_fault(self, term):
        if self.down:
            return Fault("status", status=503)
        return super()._take_fault(term)


def _search_down_run(assets, tmp_path, monkeypatch, server, plan, **extra):
    """An in-process run whose rollout answers with a query of the question's words and whose
    pubmed_mini source searches the flaky fake; `plan(step)` sets the server up before each step."""
    from deepretrieval.models.tiny import load_tiny_tokenizer
    from deepretrieval.trainer import ppo_trainer
    from deepretrieval.workers.rollout import hf

    def answer(question):
        return [f'p</think>\n<answer>{{"query": "{words_query(question)}"}}</answer>']

    monkeypatch.setattr(hf.HFRollout, "generate_sequences", scripted_rollout(load_tiny_tokenizer(), answer))
    original = ppo_trainer.ppo_step

    def step(batch, done, *args):
        plan(done + 1)
        return original(batch, done, *args)

    monkeypatch.setattr(ppo_trainer, "ppo_step", step)
    out = tmp_path / "run"
    args = overrides(assets, out, **{
        "trainer.use_ray": False, "trainer.n_gpus_per_node": 1, "trainer.val_before_train": False,
        "data.val_files": "null", "trainer.save_freq": 0, "trainer.save_hf_model": False,
        "data.max_response_length": 160, "actor_rollout_ref.rollout.n": 1,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 4, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 4,
        "algorithm.adv_estimator": "reinforce_plus_plus",  # no critic: one model in the process
        "+reward.sources.pubmed_mini.engine": "pubmed",
        "+reward.sources.pubmed_mini.base_url": server.url, "+reward.sources.pubmed_mini.cache": False,
        "+reward.sources.pubmed_mini.max_retries": 0, "+reward.sources.pubmed_mini.rate_limit": 1000,
        "+reward.sources.pubmed_mini.ratelimit_dir": str(tmp_path / "rl"),
        **extra})
    return out, [a for a in args if not a.startswith("reward.sources.pubmed_mini.index_dir=")]


def test_search_down_for_a_while_skips_steps_and_training_goes_on(assets, tmp_path, monkeypatch):
    with FlakyPubMed() as server:
        def plan(step):
            server.down = step in (2, 3)
            if step == 1:
                server.inject(Fault("status", status=503), Fault("status", status=502))  # 2 of 4 searches fail

        out, args = _search_down_run(assets, tmp_path, monkeypatch, server, plan,
                                     **{"trainer.total_training_steps": 4})
        assert main(args) == 0
    steps, _ = read_metrics(out, prefixes=("train/",))
    assert sorted(steps) == [1, 2, 3, 4]
    assert [steps[s]["train/search_unavailable_samples"] for s in (1, 2, 3, 4)] == [2.0, 4.0, 4.0, 0.0]
    assert [steps[s]["train/step_skipped"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 0.0]
    assert [steps[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 2.0, 2.0]
    # the steps with answers updated the actor; the skipped ones did not
    full, _ = read_metrics(out, prefixes=("train/",))
    assert "actor/pg_loss" in full[1] and "actor/pg_loss" in full[4]
    assert "actor/pg_loss" not in full[2] and "actor/pg_loss" not in full[3]


def test_search_down_for_k_steps_in_a_row_stops_the_run(assets, tmp_path, monkeypatch, capsys):
    with FlakyPubMed() as server:
        def plan(step):
            server.down = step >= 2

        out, args = _search_down_run(assets, tmp_path, monkeypatch, server, plan,
                                     **{"trainer.total_training_steps": 10,
                                        "trainer.max_consecutive_skipped_steps": 2})
        assert main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training failed")]
    assert len(err) == 1 and "2 steps in a row (up to step 3)" in err[0], err
    steps, _ = read_metrics(out, prefixes=("train/",))
    assert sorted(steps) == [1, 2, 3]  # stopped after the second skipped step, not at step 10


@pytest.mark.parametrize("key,value,ok", [
    ("trainer.max_restarts", 0, True), ("trainer.max_restarts", 3, True), ("trainer.max_restarts", -1, False),
    ("trainer.max_restarts", True, False), ("trainer.max_restarts", "2", False),
    ("trainer.max_consecutive_skipped_steps", None, True), ("trainer.max_consecutive_skipped_steps", 1, True),
    ("trainer.max_consecutive_skipped_steps", 0, False),
])
def test_fault_keys_are_checked(key, value, ok):
    from omegaconf import OmegaConf

    from deepretrieval.trainer.config import ConfigError, _check_fault_keys, default_config

    cfg = default_config()
    OmegaConf.update(cfg, key, value)
    if ok:
        _check_fault_keys(cfg)
    else:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _check_fault_keys(cfg)
