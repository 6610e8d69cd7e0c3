"""Chunked response log-probs/entropies equal the naive full-logits computation (values and gradients)."""

import pytest
import torch

from deepretrieval.models.tiny import make_prompt_batch, make_tiny_qwen2
from deepretrieval.workers.logprob import (chunked_log_probs_from_hidden, naive_log_probs_from_logits,
                                           naive_response_log_probs, response_log_probs)

# one intra-op thread for tiny models (see conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model(tok):
    return make_tiny_qwen2(tok, hidden_size=64, seed=1)


def _sequences(tok, resp_len=6, seed=0):
    """Left-padded prompts of different lengths followed by random response tokens."""
    prompts = make_prompt_batch(tok, ["diabetes", "a much longer prompt about heart failure and beta blockers", "x"])
    g = torch.Generator().manual_seed(seed)
    resp = torch.randint(3, len(tok), (len(prompts), resp_len), generator=g)
    ids = torch.cat([prompts.batch["input_ids"], resp], -1)
    mask = torch.cat([prompts.batch["attention_mask"], torch.ones_like(resp)], -1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, resp_len


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_equals_naive(tok, model, chunk_size, temperature):
    ids, mask, pos, r = _sequences(tok)
    with torch.no_grad():
        lp, ent = response_log_probs(model, ids, mask, pos, r, temperature=temperature, chunk_size=chunk_size,
                                     calculate_entropy=True)
        ref_lp, ref_ent = naive_response_log_probs(model, ids, mask, pos, r, temperature=temperature, calculate_entropy=True)
    assert lp.shape == (3, r) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    # log-probs are log-probabilities; entropy of a 4096-way distribution lies in [0, ln 4096]
    assert (lp <= 0).all() and (ent >= 0).all() and (ent <= torch.log(torch.tensor(float(len(tok)))) + 1e-4).all()


def test_entropy_optional(tok, model):
    ids, mask, pos, r = _sequences(tok)
    with torch.no_grad():
        lp, ent = response_log_probs(model, ids, mask, pos, r)
    assert ent is None and lp.shape == (3, r)


def test_gradients_equal_naive(tok):
    """Backward through the chunked path gives the naive path's parameter gradients."""
    ids, mask, pos, r = _sequences(tok, seed=3)
    weights = torch.rand(3, r)
    grads = []
    for fn in ("chunked", "naive"):
        model = make_tiny_qwen2(tok, hidden_size=64, seed=2)
        if fn == "chunked":
            lp, ent = response_log_probs(model, ids, mask, pos, r, temperature=0.8, chunk_size=4, calculate_entropy=True)
        else:
            lp, ent = naive_response_log_probs(model, ids, mask, pos, r, temperature=0.8, calculate_entropy=True)
        ((lp * weights).sum() + 0.3 * (ent * weights).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=2e-5, rtol=1e-4, msg=name)


def test_function_gradcheck_with_bias():
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (7,))
    fn = lambda h, w, b: chunked_log_probs_from_hidden(h, w, t, bias=b, temperature=0.7, chunk_size=3, calculate_entropy=True)
    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_hand_computed_values():
    """Two-token vocabulary: logits (0, ln 3) -> p = (1/4, 3/4)."""
    h = torch.tensor([[1.0]])
    w = torch.tensor([[0.0], [float(torch.log(torch.tensor(3.0)))]])
    lp, ent = chunked_log_probs_from_hidden(h, w, torch.tensor([1]), calculate_entropy=True)
    assert lp.item() == pytest.approx(float(torch.log(torch.tensor(0.75))), abs=1e-6)
    expected_h = -(0.25 * torch.log(torch.tensor(0.25)) + 0.75 * torch.log(torch.tensor(0.75)))
    assert ent.item() == pytest.approx(float(expected_h), abs=1e-6)
    ref_lp, ref_ent = naive_log_probs_from_logits(h @ w.t(), torch.tensor([1]), calculate_entropy=True)
    assert lp.item() == pytest.approx(ref_lp.item(), abs=1e-7) and ent.item() == pytest.approx(ref_ent.item(), abs=1e-7)


def test_hooks_removed_and_logits_unchanged(tok, model):
    ids, mask, pos, r = _sequences(tok)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        response_log_probs(model, ids, mask, pos, r)
        after = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert after.shape == (3, ids.shape[1], len(tok))
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_bad_temperature_rejected():
    with pytest.raises(ValueError, match="temperature"):
        chunked_log_probs_from_hidden(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), temperature=0.0)
