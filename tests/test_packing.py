"""Padding-free forwards (use_remove_padding): packed log-probs, entropies and values equal the padded
computation at every valid response position, gradients included; bad position ids are rejected."""

import pytest
import torch

from deepretrieval.models.tiny import make_prompt_batch, make_tiny_qwen2
from deepretrieval.workers.actor import Actor
from deepretrieval.workers.critic import Critic, ValueModel
from deepretrieval.workers.logprob import naive_response_log_probs, response_log_probs
from deepretrieval.workers.packing import (pack_inputs, packed_response_log_probs, packed_values,
                                           sequence_segments)
from deepretrieval.workers.reference import Reference, frozen_copy
from deepretrieval.workers.rollout import HFRollout
from deepretrieval.workers.config import ActorConfig, CriticConfig, RefConfig, RolloutConfig, from_dict

TEXTS = ["diabetes trials", "heart failure", "screening for colorectal cancer in adults over fifty", "asthma"]
RESP = 6


# one intra-op thread for tiny models (see conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")


def _truncate(batch, row, keep, pad_id):
    """As if sample `row` had stopped after `keep` response tokens (right padding after it)."""
    p = batch.batch["prompts"].shape[-1]
    batch.batch["response_mask"][row, keep:] = 0
    batch.batch["attention_mask"][row, p + keep:] = 0
    batch.batch["responses"][row, keep:] = pad_id
    batch.batch["input_ids"][row, p + keep:] = pad_id


@pytest.fixture(scope="module")
def batch(tok):
    """Prompts of different lengths (left padding) and responses of lengths 6, 2, 6, 4, 1, 6, 6, 3."""
    model = make_tiny_qwen2(tok, hidden_size=64, seed=4)
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"seed": 0})
    out = HFRollout(model, tok, from_dict(RolloutConfig, {"response_length": RESP, "n": 2})).generate_sequences(prompts)
    pad = tok.pad_token_id
    for row, keep in ((1, 2), (3, 4), (4, 1), (7, 3)):
        _truncate(out, row, keep, pad)
    assert (out.batch["attention_mask"][:, 0] == 0).any()  # some prompts are left-padded
    return out


def _inputs(b):
    return b.batch["input_ids"], b.batch["attention_mask"], b.batch["position_ids"]


def test_transformers_builds_block_diagonal_mask_from_position_ids(tok):
    """The mechanism packing relies on (transformers 5.24, SDPA on CPU): a packed row with restarting
    position ids gives each sequence exactly its stand-alone logits."""
    model = make_tiny_qwen2(tok, hidden_size=64, seed=1).eval()
    a, b = torch.randint(5, 100, (1, 5)), torch.randint(5, 100, (1, 7))
    with torch.no_grad():
        la = model(input_ids=a, use_cache=False).logits
        lb = model(input_ids=b, use_cache=False).logits
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None],
                       use_cache=False).logits
    torch.testing.assert_close(packed[0, :5], la[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, 5:], lb[0], atol=1e-5, rtol=0)


def test_pack_inputs_layout(batch):
    ids, mask, pos = _inputs(batch)
    packed = pack_inputs(ids, mask, pos, RESP)
    assert packed.input_ids.shape == (1, int(mask.sum()))
    assert torch.equal(packed.input_ids[0], ids[mask.bool()])
    lens = mask.sum(-1)
    assert torch.equal(sequence_segments(packed.position_ids[0]),
                       torch.repeat_interleave(torch.arange(len(lens)), lens))
    rmask = batch.batch["response_mask"]
    assert len(packed.resp_rows) == int(rmask.sum())
    assert torch.equal(packed.resp_targets, batch.batch["responses"][rmask.bool()])
    # each response token is predicted by the packed token right before it, of the same row
    assert torch.equal(packed.input_ids[0, packed.prev_index + 1], packed.resp_targets)


def test_pack_inputs_rejects_positions_that_do_not_separate_sequences():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match="position_ids"):
        pack_inputs(ids, mask, torch.tensor([[0, 1, 2], [3, 4, 5]]), 1)  # second row continues the first
    with pytest.raises(ValueError, match="no valid token"):
        pack_inputs(ids, torch.tensor([[1, 1, 1], [0, 0, 0]]), torch.tensor([[0, 1, 2], [0, 0, 0]]), 1)
    with pytest.raises(ValueError, match="first valid token"):
        pack_inputs(ids, torch.tensor([[1, 1, 1], [0, 1, 1]]), torch.tensor([[0, 1, 2], [0, 0, 1]]), 2)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_log_probs_and_gradients_equal_padded(tok, batch, temperature):
    ids, mask, pos = _inputs(batch)
    rmask = batch.batch["response_mask"].float()
    weights = torch.linspace(-1.0, 2.0, RESP)[None, :] * rmask
    results = {}
    for name, fn in (("padded", response_log_probs), ("packed", packed_response_log_probs)):
        model = make_tiny_qwen2(tok, hidden_size=64, seed=3)
        lp, ent = fn(model, ids, mask, pos, RESP, temperature=temperature, chunk_size=5, calculate_entropy=True)
        ((lp * weights).sum() + (ent * rmask).sum() * 0.3).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results[name] = (lp * rmask, ent * rmask, grads)
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = results["padded"], results["packed"]
    torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_b, ent_a, atol=1e-5, rtol=0)
    assert g_a.keys() == g_b.keys() and len(g_a) > 5
    for k in g_a:
        scale = max(1.0, float(g_a[k].abs().max()))
        assert float((g_b[k] - g_a[k]).abs().max()) <= 1e-5 * scale, k
    # and both agree with the textbook full-logits computation
    with torch.no_grad():
        ref, _ = naive_response_log_probs(make_tiny_qwen2(tok, hidden_size=64, seed=3), ids, mask, pos, RESP,
                                          temperature=temperature)
    torch.testing.assert_close(lp_b.detach(), ref * rmask, atol=1e-5, rtol=0)
    assert float(lp_b.detach()[rmask == 0].abs().max()) == 0.0


def test_packed_values_and_gradients_equal_padded(tok, batch):
    ids, mask, pos = _inputs(batch)
    rmask = batch.batch["response_mask"].float()
    out = {}
    for name in ("padded", "packed"):
        torch.manual_seed(0)
        vm = ValueModel(make_tiny_qwen2(tok, hidden_size=64, seed=3).get_decoder(), head_init_std=0.1)
        if name == "packed":
            v = packed_values(vm, ids, mask, pos, RESP)
        else:
            v = vm(input_ids=ids, attention_mask=mask, position_ids=pos)[:, -RESP - 1:-1]
        ((v * rmask) ** 2).sum().backward()
        out[name] = (v.detach() * rmask, {k: p.grad.clone() for k, p in vm.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out["packed"][0], out["padded"][0], atol=1e-5, rtol=0)
    for k, ga in out["padded"][1].items():
        # float32 summation order differs (the row lengths differ): compare relative to the gradient's scale
        scale = max(1.0, float(ga.abs().max()))
        assert float((out["packed"][1][k] - ga).abs().max()) <= 1e-5 * scale, k


def _cfg(**kw):
    cfg = {"ppo_mini_batch_size": 8, "ppo_micro_batch_size_per_gpu": 4, "ppo_epochs": 1, "clip_ratio": 0.2,
           "grad_clip": 0, "entropy_coeff": 0.01, "log_prob_micro_batch_size_per_gpu": 3,
           "optim": {"lr": 1e-2, "weight_decay": 0.0}}
    cfg.update(kw)
    return cfg


def test_actor_and_reference_with_remove_padding_match_padded(tok, batch):
    b = batch.clone()
    b.batch["advantages"] = torch.linspace(-1, 1, len(b))[:, None].expand(-1, RESP).contiguous()
    rmask = b.batch["response_mask"].float()
    params, logps = {}, {}
    for rmpad in (False, True):
        model = make_tiny_qwen2(tok, hidden_size=64, seed=5)
        actor = Actor(model, from_dict(ActorConfig, _cfg(use_remove_padding=rmpad)), optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
        lp, _ = actor.compute_log_prob(b)
        ref = Reference(frozen_copy(model), from_dict(RefConfig, {"use_remove_padding": rmpad, "log_prob_micro_batch_size_per_gpu": 5}))
        torch.testing.assert_close(ref.compute_ref_log_prob(b) * rmask, lp * rmask, atol=1e-6, rtol=0)
        data = b.clone()
        data.batch["old_log_probs"] = lp
        actor.update_policy(data)
        logps[rmpad] = lp * rmask
        params[rmpad] = {k: p.detach().clone() for k, p in model.named_parameters()}
    torch.testing.assert_close(logps[True], logps[False], atol=1e-5, rtol=0)
    moved = max(float((params[False][k] - make_tiny_qwen2(tok, hidden_size=64, seed=5).state_dict()[k]).abs().max())
                for k in params[False])
    assert moved > 1e-4  # the update did something, and the packed one did the same
    for k in params[False]:
        torch.testing.assert_close(params[True][k], params[False][k], atol=1e-5, rtol=1e-4, msg=k)


def test_critic_with_remove_padding_matches_padded(tok, batch):
    b = batch.clone()
    b.batch["returns"] = torch.linspace(0, 1, len(b))[:, None].expand(-1, RESP).contiguous()
    results = {}
    for rmpad in (False, True):
        torch.manual_seed(0)
        vm = ValueModel(make_tiny_qwen2(tok, hidden_size=64, seed=3).get_decoder())
        critic = Critic(vm, from_dict(CriticConfig, {"ppo_mini_batch_size": 8, "ppo_micro_batch_size_per_gpu": 3, "grad_clip": 0,
                             "model": {"use_remove_padding": rmpad}, "optim": {"lr": 1e-2}}),
                        optimizer=torch.optim.SGD(vm.parameters(), lr=0.5))
        v = critic.compute_values(b)
        data = b.clone()
        data.batch["values"] = v
        critic.update_critic(data)
        results[rmpad] = (v, {k: p.detach().clone() for k, p in vm.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=0)
    for k in results[False][1]:
        torch.testing.assert_close(results[True][1][k], results[False][1][k], atol=1e-5, rtol=1e-4, msg=k)
