"""Trainer configuration: composing overrides, rejecting unknown keys and impossible settings."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from deepretrieval.trainer.config import (
    CONFIG_DIR,
    ConfigError,
    compose_config,
    build_worker_config,
    default_config,
)
from deepretrieval.workers.config import per_rank_batch_config
from deepretrieval.trainer.main_ppo import main

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["data.train_files=train.parquet", "actor_rollout_ref.model.path=some/model"]
SMALL = REQUIRED + [
    "trainer.n_gpus_per_node=2", "data.train_batch_size=8", "actor_rollout_ref.rollout.n=2",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "critic.ppo_micro_batch_size_per_gpu=2",
]


def error_for(overrides):
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    return info.value


def test_defaults_compose_with_verl_keys_and_interpolations():
    cfg = compose_config(SMALL + ["trainer.logger=[console,jsonl]", "algorithm.kl_ctrl.kl_coef=0.001"])
    assert cfg.actor_rollout_ref.rollout.prompt_length == cfg.data.max_prompt_length
    assert cfg.critic.model.path == "some/model"
    assert list(cfg.trainer.logger) == ["console", "jsonl"]
    assert cfg.trainer.default_local_dir == "checkpoints/deepretrieval/run"
    assert "hydra" not in cfg and "defaults" not in cfg


def test_lora_keys_are_accepted():
    cfg = compose_config(SMALL + ["actor_rollout_ref.model.lora_rank=32", "actor_rollout_ref.model.lora_alpha=32",
                                  "actor_rollout_ref.model.target_modules=all-linear"])
    assert (cfg.actor_rollout_ref.model.lora_rank, cfg.actor_rollout_ref.model.lora_alpha) == (32, 32)
    cfg = compose_config(SMALL + ["actor_rollout_ref.model.lora_rank=8",
                                  "actor_rollout_ref.model.target_modules=[q_proj,v_proj]"])
    assert list(cfg.actor_rollout_ref.model.target_modules) == ["q_proj", "v_proj"]


def test_unknown_key_names_the_key_and_suggests():
    err = error_for(REQUIRED + ["trainer.total_epoch=3"])
    assert err.key == "trainer.total_epoch" and "did you mean 'trainer.total_epochs'" in str(err)
    err = error_for(REQUIRED + ["+trainer.brand_new=1"])  # Hydra's append syntax is no way around it
    assert err.key == "trainer.brand_new"
    err = error_for(REQUIRED + ["actor_rollout_ref.actor.optim.learning_rate=1e-6"])
    assert err.key == "actor_rollout_ref.actor.optim.learning_rate"


def test_open_sections_accept_new_keys():
    cfg = compose_config(SMALL + ["reward.sources.pubmed_mini.index_dir=/x", "reward.format_score=2",
                                     "actor_rollout_ref.model.override_config.attention_dropout=0.0"])
    assert cfg.reward.sources.pubmed_mini.index_dir == "/x"
    assert cfg.reward.format_score == 2
    assert cfg.actor_rollout_ref.model.override_config.attention_dropout == 0.0


def test_missing_required_keys():
    assert error_for(["actor_rollout_ref.model.path=m"]).key == "data.train_files"
    assert error_for(["data.train_files=x"]).key == "actor_rollout_ref.model.path"


@pytest.mark.parametrize("extra, key, phrase", [
    (["data.train_batch_size=7", "actor_rollout_ref.rollout.n=1", "actor_rollout_ref.actor.ppo_mini_batch_size=7"],
     "data.train_batch_size", "do not split evenly over 2 workers"),
    (["actor_rollout_ref.actor.ppo_mini_batch_size=3"], "actor_rollout_ref.actor.ppo_mini_batch_size",
     "not a multiple of 3"),
    (["actor_rollout_ref.actor.ppo_mini_batch_size=16"], "actor_rollout_ref.actor.ppo_mini_batch_size",
     "larger than data.train_batch_size=8"),
    # 4 prompts x 2 samples / 2 workers = 4 samples per worker, not a multiple of 3
    (["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"], "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
     "gives each of the 2 workers 4 samples"),
    (["actor_rollout_ref.actor.ppo_micro_batch_size=4"], "actor_rollout_ref.actor.ppo_micro_batch_size",
     "set only one of"),
    (["critic.ppo_micro_batch_size_per_gpu=null"], "critic.ppo_micro_batch_size_per_gpu", "must be set"),
    (["algorithm.adv_estimator=ppo"], "algorithm.adv_estimator", "must be one of gae, grpo"),
    (["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=1"], "actor_rollout_ref.rollout.n", "needs n >= 2"),
    (["actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.do_sample=false"], "actor_rollout_ref.rollout.n",
     "need do_sample=true"),
    (["trainer.logger=[console,mlflow]"], "trainer.logger", "unknown logger 'mlflow'"),
    (["trainer.resume_mode=/no/such/checkpoint"], "trainer.resume_mode", "none of these"),
    (["trainer.use_ray=false"], "trainer.use_ray", "2 devices are requested"),
    (["actor_rollout_ref.model.lora_rank=-1"], "actor_rollout_ref.model.lora_rank", "integer >= 0"),
    (["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_alpha=0"],
     "actor_rollout_ref.model.lora_alpha", "positive number"),
    (["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.target_modules=''"],
     "actor_rollout_ref.model.target_modules", "must name the modules"),
    (["actor_rollout_ref.rollout.prompt_length=3"], "actor_rollout_ref.rollout.prompt_length", "must equal"),
    (["trainer.save_freq=-5"], "trainer.save_freq", ">= -1"),
    # SMALL has mini-batch 4 of a train batch of 8: two optimiser steps, the second off-policy
    (["actor_rollout_ref.actor.recompute_old_log_prob=false"], "actor_rollout_ref.actor.recompute_old_log_prob",
     "ppo_mini_batch_size=4 < data.train_batch_size=8"),
    (["actor_rollout_ref.actor.recompute_old_log_prob=false", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
      "actor_rollout_ref.actor.ppo_epochs=2"], "actor_rollout_ref.actor.recompute_old_log_prob", "ppo_epochs=2 (needs 1)"),
    (["actor_rollout_ref.actor.recompute_old_log_prob=false", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
      "algorithm.use_kl_in_reward=true"], "actor_rollout_ref.actor.recompute_old_log_prob", "use_kl_in_reward"),
    (["reward_model.overlong_buffer.enable=yes"], "reward_model.overlong_buffer.enable", "true or false"),
    (["reward_model.overlong_buffer.enable=true", "data.max_response_length=64", "reward_model.overlong_buffer.len=64"],
     "reward_model.overlong_buffer.len", "below data.max_response_length (64)"),
    (["reward_model.overlong_buffer.enable=true", "reward_model.overlong_buffer.len=0"],
     "reward_model.overlong_buffer.len", "positive integer"),
    (["reward_model.overlong_buffer.enable=true", "reward_model.overlong_buffer.penalty_factor=-1"],
     "reward_model.overlong_buffer.penalty_factor", "number >= 0"),
])
def test_impossible_settings_are_rejected(extra, key, phrase):
    err = error_for(SMALL + extra)
    assert err.key == key
    assert phrase in str(err)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the start-up error when vllm is missing; vllm is installed here")
def test_vllm_rollout_without_vllm_fails_at_start():
    err = error_for(SMALL + ["actor_rollout_ref.rollout.name=vllm"])
    assert err.key == "actor_rollout_ref.rollout.name" and "vllm package is not installed" in str(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_gpus_requested_without_gpus_is_a_clear_error(capsys):
    assert main(SMALL + ["trainer.device=cuda"]) == 2
    assert "trainer.device" in capsys.readouterr().err


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(REQUIRED + ["trainer.total_epochz=1"]) == 2
    err = capsys.readouterr().err
    assert "trainer.total_epochz" in err and "trainer.total_epochs" in err
    assert main(REQUIRED + ["data.train_batch_size"]) == 2  # not key=value
    assert main(SMALL + ["--cfg", "reward.pubmed.api_key=SECRET123"]) == 0
    printed = capsys.readouterr().out
    assert "SECRET123" not in printed and "api_key: '***'" in printed


def test_per_rank_batch_config_follows_verl():
    cfg = compose_config(SMALL + ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=null",
                                  "actor_rollout_ref.actor.ppo_micro_batch_size=4"])
    per_rank = per_rank_batch_config(build_worker_config(cfg).actor_rollout_ref.actor, rollout_n=2, world=2)
    assert per_rank.ppo_mini_batch_size == 4  # 4 prompts x 2 samples / 2 workers
    assert per_rank.ppo_micro_batch_size_per_gpu == 2 and per_rank.ppo_micro_batch_size is None


def _yaml_keys():
    keys, stack = [], []
    in_hydra = False
    for line in (CONFIG_DIR / "ppo_trainer.yaml").read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)) // 2, m.group(2), m.group(3)
        if indent == 0:
            in_hydra = key in ("hydra", "defaults")
        if in_hydra:
            continue
        stack = stack[:indent] + [key]
        keys.append((".".join(stack), rest))
    return keys


def test_every_key_is_commented_in_yaml_and_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    leaves = []
    for dotted, rest in _yaml_keys():
        value = rest.split("#")[0].strip()
        if value == "" and "#" not in rest:  # a section header
            continue
        assert "#" in rest, f"{dotted} has no comment in ppo_trainer.yaml"
        leaves.append(dotted)
    assert len(leaves) > 100
    missing = [k for k in leaves if f"`{k}`" not in doc]
    assert not missing, f"not in docs/configuration.md: {missing}"
    # and the yaml parses to the same keys validate_config checks against
    from deepretrieval.trainer.config import _has_key

    defaults = default_config()
    assert all(_has_key(defaults, dotted) for dotted in leaves)


def test_original_recipe_script_defaults_and_overrides(tmp_path):
    import json
    import os
    import stat
    import subprocess
    import sys

    fake = tmp_path / "fakepython"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(tmp_path / 'argv.json')!r}, 'w'))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PYTHON=str(fake))
    subprocess.run(["sh", str(ROOT / "code" / "scripts" / "literature_search_train.sh"), "trainer.total_epochs=2"],
                   check=True, env=env, cwd=tmp_path)
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:2] == ["-m", "deepretrieval.trainer.main_ppo"] and argv[-1] == "trainer.total_epochs=2"
    # the recipe is a valid configuration (here without GPU / vLLM, which this machine may lack)
    cfg = compose_config(argv[2:] + ["trainer.device=cpu", "actor_rollout_ref.rollout.name=hf"])
    arr, critic, t = cfg.actor_rollout_ref, cfg.critic, cfg.trainer
    assert arr.model.path == critic.model.path == "Qwen/Qwen2.5-3B-Instruct"
    assert (t.n_gpus_per_node, cfg.data.train_batch_size, cfg.data.max_prompt_length, cfg.data.max_response_length) == (2, 64, 500, 500)
    assert (arr.actor.optim.lr, critic.optim.lr) == (1e-6, 1e-5)
    assert (arr.actor.ppo_mini_batch_size, arr.actor.ppo_micro_batch_size) == (16, 8)
    assert cfg.algorithm.use_kl_in_reward and cfg.algorithm.kl_ctrl.kl_coef == 0.001
    assert (cfg.algorithm.adv_estimator, cfg.algorithm.gamma, cfg.algorithm.lam) == ("gae", 1.0, 1.0)
    assert (arr.rollout.tensor_model_parallel_size, arr.rollout.gpu_memory_utilization) == (2, 0.2)
    assert arr.model.enable_gradient_checkpointing and arr.ref.fsdp_config.param_offload
    assert (t.save_freq, t.test_freq, t.total_epochs, t.project_name) == (50, 200, 2, "literature_search")
    assert "actor_rollout_ref.rollout.name=vllm" in argv


def test_bad_reward_section_is_a_config_error_at_start(tmp_path, capsys):
    from deepretrieval.models.tiny import load_tiny_tokenizer

    load_tiny_tokenizer().save_pretrained(str(tmp_path / "tok"))
    args = ["data.train_files=never_read.parquet", f"actor_rollout_ref.model.path={tmp_path / 'tok'}",
            "trainer.n_gpus_per_node=1", "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "critic.ppo_micro_batch_size_per_gpu=2"]
    assert main(args + ["reward.sources.my_source.k=3"]) == 2
    assert "config key 'reward.sources.my_source.engine': reward source 'my_source' has no engine" in capsys.readouterr().err
    assert main(args + ["custom_reward_function.path=/no/such/file.py"]) == 2
    assert "custom_reward_function.path" in capsys.readouterr().err
