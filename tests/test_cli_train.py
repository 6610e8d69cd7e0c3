"""`deepretrieval train key=value ...`: the trainer's entry point behind the one front door, with its
overrides passed through, its one-line configuration errors, its help, and a lazy import."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepretrieval.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "code")}


def cli(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "deepretrieval", *argv], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_bad_key_is_the_trainers_one_line_config_error():
    proc = cli("train", "trainer.totl_epochs=1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "configuration error: config key 'trainer.totl_epochs': unknown key (not in ppo_trainer.yaml); "
        "did you mean 'trainer.total_epochs'?"]
    same = cli_module_entry("trainer.totl_epochs=1")
    assert (same.returncode, same.stderr) == (proc.returncode, proc.stderr)  # the same entry as main_ppo


def cli_module_entry(*argv):
    return subprocess.run([sys.executable, "-m", "deepretrieval.trainer.main_ppo", *argv], capture_output=True,
                          text=True, env=ENV, timeout=300)


def test_help_and_listing():
    proc = cli("train", "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: deepretrieval train [--cfg] [key=value ...]")
    assert "Exit codes: 0 success, 2 configuration error" in proc.stdout  # the trainer's own help follows
    assert "train " in cli("--help").stdout


def test_overrides_reach_the_trainer_config():
    proc = cli("train", "--cfg", "data.train_files=x.parquet", "data.train_batch_size=12")
    assert proc.returncode == 0, proc.stderr
    assert "train_files: x.parquet" in proc.stdout and "train_batch_size: 12" in proc.stdout
    proc = cli("train", "data.train_files=x.parquet", "--cfg")  # --cfg anywhere, as for main_ppo
    assert proc.returncode == 0 and "train_files: x.parquet" in proc.stdout


def test_other_commands_still_reject_unknown_options():
    proc = cli("search", "--no-such-option", "q")
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-option" in proc.stderr


def test_trainer_is_imported_only_by_the_train_command():
    code = ("import sys; from deepretrieval.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('deepretrieval.trainer.main_ppo', 'omegaconf', 'hydra', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.fixture(scope="module")
def assets(tmp_path_factory, pubmed_mini_index):
    from trainer_helpers import make_assets

    return make_assets(tmp_path_factory.mktemp("cli_train"), pubmed_mini_index)


def test_one_in_process_step_through_the_front_door(assets, tmp_path):
    from trainer_helpers import overrides, read_metrics

    out = tmp_path / "run"
    extra = {"trainer.use_ray": False, "trainer.n_gpus_per_node": 1, "trainer.total_training_steps": 1,
             "trainer.val_before_train": False, "trainer.test_freq": -1, "actor_rollout_ref.rollout.n": 1,
             "actor_rollout_ref.actor.ppo_mini_batch_size": 4, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 4,
             "critic.ppo_micro_batch_size_per_gpu": 4, "trainer.save_hf_model": False}
    assert main(["train", *overrides(assets, out, **extra)]) == 0
    steps, _ = read_metrics(out)
    assert sorted(steps) == [1]
    assert (out / "global_step_1" / "trainer_state.pt").is_file()
