"""HF rollout speed options (`rollout.hf`): shared prefill, compaction, static cache, compiled step.

Each option must leave the rollout unchanged: greedy outputs token-identical to the plain loop (kept
below as `_plain_loop`, the loop as it was before the options existed), seeded sampling reproducible,
and sampling drawing from the model's distribution (a chi-square check that is shown to reject).
"""

import itertools

import pytest
import torch

from deepretrieval.models.tiny import load_tiny_tokenizer, make_prompt_batch, make_tiny_qwen2
from deepretrieval.protocol import Batch
from deepretrieval.workers.rollout import HFRollout
from deepretrieval.workers.rollout import hf as hf_module
from deepretrieval.workers.rollout.base import build_rollout_batch, resolve_sampling
from deepretrieval.workers.rollout.hf import sample_next_token
from deepretrieval.workers.config import RolloutConfig, from_dict


def chi2_ppf(q: float, df: int) -> float:
    """The chi-square quantile by bisection on its CDF, the regularised lower incomplete gamma
    P(df/2, x/2) (torch.special.gammainc); checked against printed tables in test_chi2_ppf."""
    lo, hi = 0.0, float(df) + 100.0 * (df ** 0.5 + 1.0)
    target = torch.tensor(q, dtype=torch.float64)
    for _ in range(200):
        mid = (lo + hi) / 2
        cdf = torch.special.gammainc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(mid / 2, dtype=torch.float64))
        lo, hi = (mid, hi) if cdf < target else (lo, mid)
    return (lo + hi) / 2


def test_chi2_ppf():
    # upper-tail critical values from standard chi-square tables (e.g. NIST/SEMATECH handbook 1.3.6.7.4)
    assert abs(chi2_ppf(0.95, 1) - 3.841) < 1e-3
    assert abs(chi2_ppf(0.99, 10) - 23.209) < 1e-3
    assert abs(chi2_ppf(0.999, 100) - 149.449) < 1e-3


# one intra-op thread for tiny models (see conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")


TEXTS = ["diabetes trials", "heart", "screening for colorectal cancer in adults over fifty"]
R = 10
PAD = 0
OPTIONS = [dict(shared_prefill=s, compact_every=c, cache=k)
           for s, c, k in itertools.product((False, True), (0, 1, 3), ("dynamic", "static"))]


@pytest.fixture(scope="module")
def model(tok):
    # initializer_range 0.3: greedy continuations vary with the context (at 0.02 every row repeats one
    # token), so a wrong cache row or position would change the tokens
    return make_tiny_qwen2(tok, hidden_size=64, seed=3, initializer_range=0.3).eval()


class _Tok:
    def __init__(self, eos, pad):
        self.eos_token_id, self.pad_token_id = eos, pad


def _rollout(model, eos_ids, hf=None, **cfg):
    rollout = HFRollout(model, _Tok(eos_ids[0], PAD), from_dict(RolloutConfig, dict({"response_length": R, "hf": hf or {}}, **cfg)))
    rollout.eos_ids = list(eos_ids)  # only these end a response (not the model config's own eos)
    rollout.static_min_rows = 1  # let the static cache compact these 6-9 row batches (default floor: 16)
    return rollout


@torch.no_grad()
def _plain_loop(model, prompts, eos_ids, config):
    """Reference: the loop before `rollout.hf` (n prompt copies prefilled, every row decoded to the end)."""
    params = resolve_sampling(from_dict(RolloutConfig, config), prompts.meta_info)
    if params.n > 1:
        prompts = prompts.repeat(params.n, interleave=True)
    gen = None
    if prompts.meta_info.get("seed") is not None:
        gen = torch.Generator().manual_seed(int(prompts.meta_info["seed"]))
    micro = int(config.get("micro_batch_size") or 0) * params.n or len(prompts)
    eos = torch.tensor(eos_ids)
    chunks = []
    for start in range(0, len(prompts), micro):
        ids, mask, pos = (prompts.batch[k][start:start + micro] for k in ("input_ids", "attention_mask", "position_ids"))
        resp = torch.full((ids.shape[0], R), PAD, dtype=torch.long)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool)
        next_pos = pos[:, -1] + 1
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        for step in range(R):
            token = sample_next_token(out.logits[:, -1, :].float(), params, gen)
            token = torch.where(finished, torch.full_like(token, PAD), token)
            resp[:, step] = token
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or step == R - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None], use_cache=True,
                        logits_to_keep=1, cache=out.cache)
            next_pos = next_pos + 1
        chunks.append(resp)
    return build_rollout_batch(prompts, torch.cat(chunks), eos_ids, PAD)


def _assert_same_batch(out, ref):
    assert set(out.batch.keys()) == set(ref.batch.keys())
    for key in ref.batch.keys():
        assert torch.equal(out.batch[key], ref.batch[key]), key


@pytest.fixture(scope="module")
def staggered_eos(tok, model):
    """EOS ids that end the 3 prompts' greedy responses at 3 different steps (one row never ends)."""
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"validate": True})
    free = _plain_loop(model, prompts, [-1], {}).batch["responses"]
    eos = [int(free[0, 1]), int(free[1, 4])]
    lengths = _plain_loop(model, prompts, eos, {}).batch["response_mask"].sum(-1)
    assert len(set(lengths.tolist())) == 3 and R in lengths.tolist(), lengths
    return eos


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_greedy_token_identical_to_plain_loop(tok, model, staggered_eos, opts):
    """n=3 (top-k 1 sampling is greedy, so the 3 copies must equal the plain loop too), left padding of
    different prompt lengths, rows ending at different steps, micro-batches, and greedy validation."""
    cases = [({"n": 3, "top_k": 1, "seed": 1}, {}), ({"n": 3, "top_k": 1, "seed": 1}, {"micro_batch_size": 2}),
             ({"validate": True}, {})]
    for meta, cfg in cases:
        prompts = make_prompt_batch(tok, TEXTS, meta_info=meta)
        ref = _plain_loop(model, prompts, staggered_eos, cfg)
        out = _rollout(model, staggered_eos, opts, **cfg).generate_sequences(prompts)
        _assert_same_batch(out, ref)
        assert len(out) == len(TEXTS) * (3 if "n" in meta else 1)


def test_compaction_all_rows_finish_at_step_0_and_none_finish(tok, model):
    meta = {"n": 2, "top_k": 1, "seed": 1}
    prompts = make_prompt_batch(tok, TEXTS, meta_info=meta)
    first = _plain_loop(model, prompts, [-1], {}).batch["responses"][:, 0].unique().tolist()
    for eos in (first, [-1]):  # every row's first token is an EOS / no row ever ends
        ref = _plain_loop(model, prompts, eos, {})
        for cache in ("dynamic", "static"):
            out = _rollout(model, eos, {"compact_every": 1, "cache": cache}).generate_sequences(prompts)
            _assert_same_batch(out, ref)
        lengths = ref.batch["response_mask"].sum(-1).tolist()
        assert lengths == [1] * 6 if eos == first else lengths == [R] * 6


def test_static_buckets_reuse_one_buffer(tok, model, staggered_eos):
    """Compaction on the static cache moves to power-of-two batch sizes whose buffers are views of the
    first rows of one pooled buffer (no extra memory, stable addresses across calls)."""
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"n": 3, "top_k": 1, "seed": 1})
    rollout = _rollout(model, staggered_eos, {"compact_every": 1, "cache": "static"})
    rollout.generate_sequences(prompts)
    pool = rollout._static_pool
    assert sorted(pool.caches) == [4, 8, 9]  # 9 rows; 6 live (-> 8), then 3 live (-> 4)
    base = pool.caches[9].layers[0].keys
    ptr = base.data_ptr()
    assert all(c.layers[0].keys.data_ptr() == ptr for c in pool.caches.values())
    rollout.generate_sequences(prompts)
    assert rollout._static_pool is pool and pool.caches[9].layers[0].keys.data_ptr() == ptr
    # the default floor (16 rows) keeps a 9-row batch whole: no more compiled shapes for tiny batches
    rollout = HFRollout(model, _Tok(staggered_eos[0], PAD), from_dict(RolloutConfig, {"response_length": R, "hf": {"cache": "static"}}))
    rollout.eos_ids = staggered_eos
    _assert_same_batch(rollout.generate_sequences(prompts), _plain_loop(model, prompts, staggered_eos, {}))
    assert rollout.compact_every == 4 and sorted(rollout._static_pool.caches) == [9]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_seeded_sampling_reproducible(tok, model, staggered_eos, opts):
    rollout = _rollout(model, staggered_eos, opts, n=3, temperature=1.0, top_p=0.95)
    a, b, c = (rollout.generate_sequences(make_prompt_batch(tok, TEXTS, meta_info={"seed": s})) for s in (7, 7, 8))
    assert torch.equal(a.batch["responses"], b.batch["responses"])
    assert not torch.equal(a.batch["responses"], c.batch["responses"])
    # the 3 samples of a prompt are independent draws, not copies
    assert len({tuple(r) for r in a.batch["responses"][:3].tolist()}) > 1


@pytest.fixture(scope="module")
def sampled_eos(tok, model):
    """EOS ids that end seed-3 sampled responses (3 prompts x n=3) at several different steps."""
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"seed": 3, "n": 3})
    free = _plain_loop(model, prompts, [-1], {"temperature": 1.0}).batch["responses"]
    eos = [int(free[0, 2]), int(free[4, 5]), int(free[7, 1])]
    lengths = _plain_loop(model, prompts, eos, {"temperature": 1.0}).batch["response_mask"].sum(-1).tolist()
    assert len(set(lengths)) >= 3 and R in lengths, lengths
    return eos


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_same_seed_same_samples_as_plain_loop(tok, model, sampled_eos, opts):
    """Draws are made for the full batch every step (finished or compacted rows included), so every
    option reproduces the plain loop's samples for a seed (here no float near-tie flips a draw)."""
    for cfg in ({"temperature": 1.0}, {"temperature": 0.8, "top_p": 0.9, "micro_batch_size": 2}):
        prompts = make_prompt_batch(tok, TEXTS, meta_info={"seed": 3, "n": 3})
        ref = _plain_loop(model, prompts, sampled_eos, cfg)
        _assert_same_batch(_rollout(model, sampled_eos, opts, **cfg).generate_sequences(prompts), ref)


# --- distribution: joint law of the first two tokens ----------------------------------------------

V = 8  # tiny vocabulary: every (t1, t2) cell gets enough samples


@pytest.fixture(scope="module")
def tiny_vocab_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, initializer_range=0.1, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(cfg).eval()


@torch.no_grad()
def _joint_probs(model, prompt, eos, temperature):
    """P(t1, t2) by full forwards: p(t1) p(t2 | t1); an EOS first token is followed by pad (cell (eos, PAD))."""
    p1 = torch.softmax(model(input_ids=prompt).logits[0, -1] / temperature, -1)
    joint = torch.zeros(V, V, dtype=torch.float64)
    for t1 in range(V):
        if t1 == eos:
            joint[t1, PAD] = p1[t1]
            continue
        ids = torch.cat([prompt, torch.tensor([[t1]])], -1)
        joint[t1] = p1[t1] * torch.softmax(model(input_ids=ids).logits[0, -1] / temperature, -1)
    return joint


def _chi_square(counts, probs):
    expected = probs * counts.sum()
    assert (counts[expected == 0] == 0).all(), "a sample in a cell of probability 0"
    keep = expected > 0
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, int(keep.sum()) - 1


@pytest.mark.parametrize("opts", [dict(shared_prefill=True, compact_every=1, cache="dynamic"),
                                  dict(shared_prefill=True, compact_every=1, cache="static")],
                         ids=["dynamic", "static"])
def test_shared_prefill_samples_follow_the_model(tiny_vocab_model, opts):
    """9000 samples of one prompt (shared prefill expands one cache row 9000-fold; EOS = token 3, so
    the ~10% of rows that draw it first are compacted away before step 2 — on the static cache to 8192
    rows, live rows plus padding copies): the (t1, t2) counts match p(t1) p(t2 | t1) by chi-square at
    the 1e-4 level, and the same test rejects wrong laws."""
    model, eos, n, temperature = tiny_vocab_model, 3, 9000, 0.9
    prompt = torch.tensor([[1, 5, 2, 6, 4]])
    prompts = Batch.from_dict(
        {"input_ids": torch.cat([torch.full((1, 2), PAD), prompt], -1),  # left padding too
         "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 1]]),
         "position_ids": torch.tensor([[0, 0, 0, 1, 2, 3, 4]])}, meta_info={"seed": 0, "n": n})
    rollout = HFRollout(model, _Tok(eos, PAD), from_dict(RolloutConfig, {"response_length": 2, "temperature": temperature, "hf": opts}))
    rollout.eos_ids = [eos]
    resp = rollout.generate_sequences(prompts).batch["responses"]
    if opts["cache"] == "static":
        assert sorted(rollout._static_pool.caches) == [8192, 9000]
    counts = torch.bincount(resp[:, 0] * V + resp[:, 1], minlength=V * V).view(V, V).double()

    joint = _joint_probs(model, prompt, eos, temperature)
    stat, df = _chi_square(counts, joint)
    bound = chi2_ppf(1 - 1e-4, df)
    assert stat < bound, (stat, bound)
    # the same check rejects: a slightly wrong temperature, and the classic shared-prefill bug of one
    # draw copied to several samples (here: each block of 8 samples made a copy of its first sample)
    assert _chi_square(counts, _joint_probs(model, prompt, eos, temperature * 1.3))[0] > bound
    copied = resp[::8].repeat_interleave(8, 0)
    copied_counts = torch.bincount(copied[:, 0] * V + copied[:, 1], minlength=V * V).view(V, V).double()
    assert _chi_square(copied_counts, joint)[0] > bound


# --- compiled step ---------------------------------------------------------------------------------

def test_compiled_step_traces_whole_and_matches(tok, model, staggered_eos):
    """The static decode step traces as one graph per batch size (fullgraph: no graph break, which CUDA
    graphs need), is not retraced on the next call, and gives the plain loop's tokens. Traced with a counting eager
    backend: inductor's code generation takes about a minute on 2 CPU cores (see the slow test)."""
    import torch._dynamo.testing

    prompts = make_prompt_batch(tok, TEXTS, meta_info={"n": 3, "top_k": 1, "seed": 1})
    ref = _plain_loop(model, prompts, staggered_eos, {})
    rollout = _rollout(model, staggered_eos, {"cache": "static", "compact_every": 1})
    counter = torch._dynamo.testing.CompileCounter()
    rollout._compiled_step = torch.compile(hf_module._last_logits, backend=counter, dynamic=False, fullgraph=True)
    try:
        _assert_same_batch(rollout.generate_sequences(prompts), ref)
        assert counter.frame_count == len(rollout._static_pool.caches) == 3  # one graph per batch size: 9, 8, 4
        _assert_same_batch(rollout.generate_sequences(prompts), ref)
        assert counter.frame_count == 3
    finally:
        torch._dynamo.reset()


def test_compile_options_validated(tok, model):
    with pytest.raises(ValueError, match="cache=static"):
        _rollout(model, [1], {"compile": True})
    with pytest.raises(ValueError, match="dynamic or static"):
        _rollout(model, [1], {"cache": "paged"})
    assert hf_module._compile_mode(True, torch.device("cpu")) == "default"
    assert hf_module._compile_mode(True, torch.device("cuda")) == "reduce-overhead"
    assert hf_module._compile_mode("max-autotune", torch.device("cpu")) == "max-autotune"
    assert hf_module._compile_mode(False, torch.device("cpu")) is None


@pytest.mark.slow
def test_inductor_compiled_rollout_matches(tok, model, staggered_eos):
    """Real inductor compile on CPU (about a minute): greedy tokens equal, with compaction buckets."""
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"n": 3, "top_k": 1, "seed": 1})
    ref = _plain_loop(model, prompts, staggered_eos, {})
    rollout = _rollout(model, staggered_eos, {"cache": "static", "compile": True, "compact_every": 1})
    try:
        for _ in range(2):
            _assert_same_batch(rollout.generate_sequences(prompts), ref)
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_rollout_matches(tok, staggered_eos):
    """CUDA graphs (compile mode reduce-overhead) on GPU: greedy tokens equal to the plain eager loop."""
    gpu_model = make_tiny_qwen2(tok, hidden_size=64, seed=3, initializer_range=0.3).eval().cuda()
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"n": 3, "top_k": 1, "seed": 1})
    ref = _rollout(gpu_model, staggered_eos, {"shared_prefill": False}).generate_sequences(prompts)
    rollout = _rollout(gpu_model, staggered_eos, {"cache": "static", "compile": True, "compact_every": 1})
    try:
        for _ in range(2):
            _assert_same_batch(rollout.generate_sequences(prompts), ref)
    finally:
        torch._dynamo.reset()


def test_trainer_config_validates_hf_keys():
    """`rollout.hf.*` are known keys with the documented defaults; bad values fail at start."""
    from deepretrieval.trainer.config import ConfigError, compose_config

    base = ["data.train_files=train.parquet", "actor_rollout_ref.model.path=some/model", "trainer.n_gpus_per_node=1",
            "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "critic.ppo_micro_batch_size_per_gpu=2"]
    hf = compose_config(base).actor_rollout_ref.rollout.hf
    assert (hf.shared_prefill, hf.compact_every, hf.cache, hf.compile) == (True, 4, "dynamic", False)
    rollout = HFRollout(make_tiny_qwen2(hidden_size=32), load_tiny_tokenizer(), from_dict(RolloutConfig, {"response_length": 2}))
    assert (rollout.shared_prefill, rollout.compact_every, rollout.cache_impl, rollout._compiled_step) == \
        (True, 4, "dynamic", None)  # the code's defaults (no `hf` section, e.g. the eval runner) are the yaml's
    compose_config(base + ["actor_rollout_ref.rollout.hf.cache=static",
                           "actor_rollout_ref.rollout.hf.compile=reduce-overhead"])
    for extra, phrase in ((["actor_rollout_ref.rollout.hf.cache=paged"], "must be one of dynamic, static"),
                          (["actor_rollout_ref.rollout.hf.compact_every=-1"], "integer >= 0"),
                          (["actor_rollout_ref.rollout.hf.compile=true"], "needs rollout.hf.cache=static"),
                          (["actor_rollout_ref.rollout.hf.cache=static", "actor_rollout_ref.rollout.hf.compile=fast"],
                           "must be true, false or one of"),
                          (["actor_rollout_ref.rollout.hf.compile_mode=x"], "unknown key")):
        with pytest.raises(ConfigError, match=phrase):
            compose_config(base + extra)
