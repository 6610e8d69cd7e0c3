"""LoRA training in the PPO trainer (`actor_rollout_ref.model.lora_rank > 0`), on CPU.

- the merged-weights iterator the vLLM rollout loads (plain HF names, W + scaling * B @ A) against peft's
  own `merge_and_unload()`, plain and FSDP2-sharded;
- end to end on Ray with 2 FSDP2 workers: GRPO with a KL loss (reference = the actor with its adapter
  disabled, no second model), checkpoints, resume -> identical metrics, merged HF export + peft adapter;
- the in-process mode (`trainer.use_ray=false`) for one step;
- the policy gradient through the adapter, with scripted good and broken answers.
"""

import copy
import json

import pytest
import torch

from deepretrieval.models.tiny import make_tiny_qwen2
from deepretrieval.workers.actor import apply_lora
from trainer_helpers import hf_weights, make_assets, scripted_rollout, stable, words_query
from trainer_helpers import overrides as common_overrides
from trainer_helpers import read_metrics as read_log

LORA = {"actor_rollout_ref.model.lora_rank": 8, "actor_rollout_ref.model.lora_alpha": 16,
        "actor_rollout_ref.model.target_modules": "all-linear"}


# ---------------------------------------------------------------------------------------------------
# merged weights (vLLM sync, HF export)


def _lora_model(target_modules, tied=True, seed=0):
    torch.manual_seed(seed)
    model = make_tiny_qwen2(hidden_size=64, num_layers=2, seed=seed, tie_word_embeddings=tied)
    plain_names = list(model.state_dict())
    peft_model = apply_lora(model, 4, 8, target_modules)
    with torch.no_grad():  # B starts at 0 (merge would be a no-op): give the adapter a real delta
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    return peft_model, plain_names


@pytest.mark.parametrize("target_modules,tied", [("all-linear", True), ("q_proj,v_proj", False)])
def test_merged_weights_equal_peft_merge_and_unload(target_modules, tied):
    from deepretrieval.workers.lora import lora_specs, merged_named_tensors
    from deepretrieval.workers.rollout.vllm import iter_weight_buckets

    peft_model, plain_names = _lora_model(target_modules, tied)
    specs = lora_specs(peft_model)
    assert len(specs) == (14 if target_modules == "all-linear" else 4)
    merged_ref = copy.deepcopy(peft_model).merge_and_unload()
    expected = merged_ref.state_dict()
    assert set(expected) == set(plain_names)

    # the full state dict (tied weights under both names) -> exactly the plain HF state dict's names
    got = dict(merged_named_tensors(peft_model.state_dict().items(), specs))
    assert set(got) == set(plain_names)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)
    adapted = [n for n in plain_names if n.rsplit(".", 1)[0] in specs and n.endswith(".weight")]
    base = dict(make_tiny_qwen2(hidden_size=64, num_layers=2, seed=0, tie_word_embeddings=tied).state_dict())
    assert adapted and all(not torch.allclose(got[n], base[n]) for n in adapted)  # the delta is really in

    # what the vLLM rollout loads: parameters (tied once), small buckets, cast to the engine dtype
    buckets = list(iter_weight_buckets(peft_model, 20_000, dtype=torch.bfloat16))
    assert len(buckets) > 2
    names = [n for b in buckets for n, _ in b]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, _ in merged_ref.named_parameters()}
    for b in buckets:
        for name, tensor in b:
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name


def test_merged_weights_from_fsdp2_shards_and_unsupported_adapters():
    import torch.distributed as dist

    from deepretrieval.workers import fsdp as fsdp_utils
    from deepretrieval.workers.lora import lora_specs
    from deepretrieval.workers.rollout.vllm import iter_weight_buckets

    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        peft_model, _ = _lora_model("all-linear")
        expected = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
        fsdp_utils.apply_fsdp2(peft_model, device_type="cpu", mixed_precision="fp32")
        assert any(hasattr(p, "full_tensor") for p in peft_model.parameters())
        got = {n: t for b in iter_weight_buckets(peft_model, 1 << 20) for n, t in b}
        assert set(got) == set(expected)
        for name, tensor in got.items():
            torch.testing.assert_close(tensor, expected[name].detach(), atol=1e-6, rtol=0, msg=name)
    finally:
        if created:
            dist.destroy_process_group()

    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(make_tiny_qwen2(hidden_size=64, num_layers=1),
                          LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match="DoRA"):
        lora_specs(dora)


# ---------------------------------------------------------------------------------------------------
# the trainer


@pytest.fixture(scope="module")
def assets(tmp_path_factory, pubmed_mini_index):
    return make_assets(tmp_path_factory.mktemp("trainer_lora"), pubmed_mini_index)


def overrides(a, out_dir, **extra):
    return common_overrides(a, out_dir, **{
        "actor_rollout_ref.actor.optim.lr": 1e-2,
        # GRPO with the KL in the loss (verl's recipe). The tiny model never writes a parsable answer, so all
        # samples score alike and the advantages are 0: an entropy bonus gives the adapter a gradient
        "actor_rollout_ref.actor.use_kl_loss": True, "actor_rollout_ref.actor.kl_loss_coef": 0.1,
        "actor_rollout_ref.actor.entropy_coeff": 0.01, "algorithm.use_kl_in_reward": False,
        "algorithm.adv_estimator": "grpo", "trainer.val_before_train": False, **LORA, **extra})


def read_steps(out_dir):
    return read_log(out_dir, prefixes=("actor/",))[0]


def run(args):
    """Train like `main_ppo` does, keeping the trainer's view of its workers."""
    from deepretrieval.trainer.config import compose_config
    from deepretrieval.trainer.ppo_trainer import PPOTrainer

    trainer = PPOTrainer(compose_config(args))
    try:
        trainer.fit()
        return trainer.actor_worker_info
    finally:
        trainer.shutdown()


def test_ray_fsdp2_lora_grpo_kl_checkpoint_resume_merged_export(assets, tmp_path):
    import torch.distributed.checkpoint as dcp
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_a, run_b = tmp_path / "a", tmp_path / "b"
    common = {"trainer.n_gpus_per_node": 2, "trainer.total_training_steps": 2, "trainer.save_freq": 1}
    info = run(overrides(assets, run_a, **common))
    # no reference model was built: the reference is the actor with its adapter disabled
    assert len(info) == 2
    for rank_info in info:
        assert rank_info["fsdp"] and rank_info["lora"]
        assert rank_info["reference"] == "actor_adapter_disabled" and rank_info["ref_model_params"] == 0
        assert 0 < rank_info["trainable_params"] < rank_info["local_params"] / 2
    steps_a = read_steps(run_a)
    assert sorted(steps_a) == [1, 2]
    for key in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm", "val/pubmed_mini/recall_mean"):
        assert key in steps_a[2], key
    # step 2's reference (base) differs from its policy (trained adapter): the KL term is live
    assert steps_a[2]["actor/kl_loss"] > 0

    ckpt = run_a / "global_step_2" / "actor"
    # the sharded state holds the adapter (and its optimiser state) only, not the frozen base
    model_keys = [k for k in dcp.FileSystemReader(str(ckpt / "model_optim")).read_metadata().state_dict_metadata
                  if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)

    hf_dir, adapter_dir = ckpt / "huggingface", ckpt / "lora_adapter"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (hf_dir / name).is_file(), name
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (adapter_dir / name).is_file(), name
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"], adapter_cfg["peft_type"]) == (8, 16, "LORA")
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]

    # the merged folder is a plain transformers model
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    assert not hasattr(model, "peft_config")
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tok("diabetes insulin", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3 or tok.eos_token_id in out[0].tolist()

    # only the adapter trained: initial base + saved adapter, merged by peft == the exported merged weights
    final, initial = hf_weights(hf_dir), hf_weights(assets.model)
    assert set(final) == set(initial)
    base = AutoModelForCausalLM.from_pretrained(str(assets.model), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().state_dict()
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, merged[name], atol=1e-6, rtol=0, msg=name)
    adapted = [k for k in final if k.endswith("_proj.weight")]
    assert adapted and any(not torch.equal(final[k], initial[k]) for k in adapted)
    untouched = [k for k in final if not k.endswith("_proj.weight")]  # embeddings, norms, biases
    assert untouched and all(torch.equal(final[k], initial[k]) for k in untouched)

    # resume after step 1 in a fresh folder: step 2 as in the straight run
    info_b = run(overrides(assets, run_b, **common, **{"trainer.resume_mode": str(run_a / "global_step_1")}))
    assert all(i["reference"] == "actor_adapter_disabled" for i in info_b)
    steps_b = read_steps(run_b)
    assert sorted(steps_b) == [2]
    assert stable(steps_b[2]) == stable(steps_a[2])
    resumed = hf_weights(run_b / "global_step_2" / "actor" / "huggingface")
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_in_process_lora_step_reference_is_the_base_model(assets, tmp_path):
    from deepretrieval.protocol import Batch
    from deepretrieval.trainer.config import compose_config
    from deepretrieval.trainer.ppo_trainer import PPOTrainer
    from deepretrieval.workers.actor import batched_response_log_probs
    from transformers import AutoModelForCausalLM

    out = tmp_path / "local"
    args = overrides(assets, out, **{"trainer.use_ray": False, "trainer.n_gpus_per_node": 1,
                                     "trainer.total_training_steps": 1, "data.val_files": "null",
                                     "actor_rollout_ref.actor.ppo_mini_batch_size": 4,
                                     "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 4})
    trainer = PPOTrainer(compose_config(args))
    try:
        trainer.fit()
        worker = trainer.actor_wg.worker
        assert worker.ref_model is None and worker.reference.model is worker.model  # no second model
        assert worker.reference.disable_adapter
        trainable = [n for n, p in worker.model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert {id(p) for g in worker.optimizer.param_groups for p in g["params"]} == {
            id(p) for p in worker.model.parameters() if p.requires_grad}
        # after an update the reference still gives the initial (base) model's log-probs, the actor not
        batch = Batch.from_single_dict(trainer.loader.next_batch())
        batch.meta_info["seed"] = 3
        rolled = trainer.actor_wg.generate_sequences(batch)
        ref = worker.compute_ref_log_prob(rolled).batch["ref_log_prob"]
        cur = worker.compute_log_prob(rolled).batch["old_log_probs"]
        base = AutoModelForCausalLM.from_pretrained(str(assets.model), dtype=torch.float32)
        temperature = float(rolled.meta_info.get("temperature", 1.0) or 1.0)
        expected, _ = batched_response_log_probs(base, rolled, micro_batch_size=None, temperature=temperature)
        mask = rolled.batch["response_mask"].bool()
        torch.testing.assert_close(ref[mask], expected[mask], atol=1e-5, rtol=0)
        assert (cur[mask] - ref[mask]).abs().max() > 1e-4
        assert all(p.requires_grad for n, p in worker.model.named_parameters() if n in trainable)
    finally:
        trainer.shutdown()
    steps = read_steps(out)
    assert sorted(steps) == [1] and "actor/kl_loss" in steps[1]
    ckpt = out / "global_step_1" / "actor"
    assert (ckpt / "lora_adapter" / "adapter_model.safetensors").is_file()
    assert (ckpt / "huggingface" / "model.safetensors").is_file()


def test_lora_policy_gradient_raises_the_better_answer(assets, tmp_path, monkeypatch):
    """The other LoRA runs see equal scores (advantages 0) and train on an entropy bonus. Here every prompt gets
    two scripted samples, a well-formed answer (score 1 + tier >= -2.5) and one without answer tags (format
    penalty -4): GRPO's advantages are +-1/sqrt(2) in every group. With no entropy bonus and no KL the
    adapter's only gradient is the policy gradient, and one step must raise the log-probability of each
    good answer relative to its group's broken one: the first-order change of the PPO objective
    sum_i A_i sum_t (log pi'_it - log pi_it), positive for any descent step."""
    from transformers import AutoModelForCausalLM

    from deepretrieval.models.tiny import load_tiny_tokenizer
    from deepretrieval.trainer.config import compose_config
    from deepretrieval.trainer.ppo_trainer import PPOTrainer
    from deepretrieval.workers.actor import batched_response_log_probs
    from deepretrieval.workers.rollout import hf

    def answers(question):
        return [f'plan</think>\n<answer>{{"query": "{words_query(question)}"}}</answer>',
                f"plan</think>\n{words_query(question)}"]

    record = []
    monkeypatch.setattr(hf.HFRollout, "generate_sequences", scripted_rollout(load_tiny_tokenizer(), answers, record))
    out = tmp_path / "pg"
    args = overrides(assets, out, **{
        "trainer.use_ray": False, "trainer.n_gpus_per_node": 1, "trainer.total_training_steps": 1,
        "data.val_files": "null", "trainer.save_freq": 0, "trainer.save_hf_model": False,
        "data.max_response_length": 160, "actor_rollout_ref.actor.ppo_mini_batch_size": 4,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 4, "actor_rollout_ref.actor.use_kl_loss": False,
        "actor_rollout_ref.actor.entropy_coeff": 0.0, "actor_rollout_ref.actor.optim.lr": 1e-3})
    trainer = PPOTrainer(compose_config(args))
    try:
        trainer.fit()
        worker = trainer.actor_wg.worker
        rolled = record[0]
        after = worker.compute_log_prob(rolled).batch["old_log_probs"]
    finally:
        trainer.shutdown()
    row = read_steps(out)[1]
    assert row["reward/format_error_ratio"] == pytest.approx(0.5)
    assert row["critic/advantages/max"] == pytest.approx(2 ** -0.5, abs=1e-3)
    assert row["critic/advantages/min"] == pytest.approx(-(2 ** -0.5), abs=1e-3)
    assert row["actor/pg_loss"] != 0.0 and row["actor/grad_norm"] > 0

    base = AutoModelForCausalLM.from_pretrained(str(assets.model), dtype=torch.float32)  # B = 0: the initial policy
    before, _ = batched_response_log_probs(base, rolled, micro_batch_size=None, temperature=1.0)
    mask = rolled.batch["response_mask"].float()
    gain = ((after - before) * mask).sum(-1)  # per sample
    good, broken = gain[0::2], gain[1::2]
    assert (good.abs() > 0).all() and (broken.abs() > 0).all()  # the adapter moved every sample's log-prob
    assert (good > broken).all(), (good, broken)  # in every group
