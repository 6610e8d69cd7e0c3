"""HF rollout: masks through EOS, padding, positions, n samples, greedy validation, sampling filters."""

import numpy as np
import pytest
import torch

from deepretrieval.models.tiny import make_prompt_batch, make_tiny_qwen2
from deepretrieval.protocol import Batch
from deepretrieval.workers.rollout import HFRollout, build_rollout_batch, pad_responses, response_mask_from_eos
from deepretrieval.workers.rollout.base import resolve_sampling
from deepretrieval.workers.rollout.hf import filter_logits
from deepretrieval.workers.config import RolloutConfig, from_dict

# one intra-op thread for tiny models (see conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["diabetes trials", "heart", "screening for colorectal cancer in adults over fifty"]


@pytest.fixture(scope="module")
def model(tok):
    return make_tiny_qwen2(tok, hidden_size=64, seed=3)


class _Tok:
    """Duck-typed tokenizer: only the ids the rollout reads."""

    def __init__(self, eos, pad):
        self.eos_token_id, self.pad_token_id = eos, pad


def _greedy_reference(model, ids, length):
    """Argmax decoding by full forwards of the growing unpadded sequence (no cache, no masks)."""
    out = []
    with torch.no_grad():
        for _ in range(length):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            out.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], -1)
    return out


def test_greedy_left_padded_matches_unpadded_reference(tok, model):
    rollout = HFRollout(model, tok, from_dict(RolloutConfig, {"response_length": 7, "n": 4}))
    out = rollout.generate_sequences(make_prompt_batch(tok, TEXTS, meta_info={"validate": True}))
    assert len(out) == len(TEXTS)  # greedy validation: no repetition
    for i, text in enumerate(TEXTS):
        single = make_prompt_batch(tok, [text])
        expected = _greedy_reference(model, single.batch["input_ids"], 7)
        mask = out.batch["response_mask"][i].bool()
        assert out.batch["responses"][i][mask].tolist() == expected[: int(mask.sum())]


def _first_new_token(responses):
    """(row, step) of the first token (step >= 1) that its row has not emitted before."""
    for row, seq in enumerate(responses.tolist()):
        for step in range(1, len(seq)):
            if seq[step] not in seq[:step]:
                return row, step
    raise AssertionError("every row repeats a single token; pick another seed")


def test_masks_positions_and_pad_after_eos(tok, model):
    """Declare as EOS a token that one row emits mid-way: that row stops there (mask 1 through the
    EOS, pad after it); rows that never emit it run to the full length. Seeded sampling makes the two
    runs draw the same tokens up to the stop."""
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"seed": 11, "n": 1, "temperature": 1.0})
    free = HFRollout(model, tok, from_dict(RolloutConfig, {"response_length": 8})).generate_sequences(prompts)
    row, step = _first_new_token(free.batch["responses"])
    eos = int(free.batch["responses"][row, step])
    pad = tok.pad_token_id
    rollout = HFRollout(model, _Tok(eos, pad), from_dict(RolloutConfig, {"response_length": 8}))
    rollout.eos_ids = [eos]  # drop the model config's own eos id (never produced here anyway)
    out = rollout.generate_sequences(prompts)
    resp, mask = out.batch["responses"], out.batch["response_mask"]
    assert mask[row].tolist() == [1] * (step + 1) + [0] * (7 - step)
    assert resp[row, : step + 1].tolist() == free.batch["responses"][row, : step + 1].tolist()
    assert (resp[row, step + 1:] == pad).all()
    never = [i for i in range(len(TEXTS)) if not (free.batch["responses"][i] == eos).any()]
    assert never, "expected at least one row that never emits the chosen EOS"
    for i in never:  # a row that never emits EOS: full-length mask, no padding inside
        assert mask[i].tolist() == [1] * 8
        assert torch.equal(resp[i], free.batch["responses"][i])
    P = prompts.batch["input_ids"].shape[1]
    assert torch.equal(out.batch["prompts"], prompts.batch["input_ids"])
    assert torch.equal(out.batch["input_ids"], torch.cat([prompts.batch["input_ids"], resp], -1))
    assert torch.equal(out.batch["attention_mask"], torch.cat([prompts.batch["attention_mask"], mask], -1))
    last = prompts.batch["position_ids"][:, -1:]
    assert torch.equal(out.batch["position_ids"][:, P:], last + torch.arange(1, 9))
    assert torch.equal(out.batch["position_ids"][:, :P], prompts.batch["position_ids"])


def test_response_mask_from_eos_hand_cases():
    eos = [5, 9]
    responses = torch.tensor([
        [1, 2, 5, 7, 5],   # stops at position 2
        [5, 1, 1, 1, 1],   # EOS first
        [1, 2, 3, 4, 6],   # never stops
        [1, 9, 0, 0, 0],   # second EOS id
    ])
    mask = response_mask_from_eos(responses, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    with_len = response_mask_from_eos(responses, eos, lengths=torch.tensor([5, 5, 3, 5]))
    assert with_len[2].tolist() == [1, 1, 1, 0, 0]


def test_build_rollout_batch_from_engine_lists():
    """The path a vLLM engine uses: token lists of different lengths -> padded batch."""
    prompts = Batch.from_dict({"input_ids": torch.tensor([[0, 7, 8], [6, 7, 8]]),
                               "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
                               "position_ids": torch.tensor([[0, 0, 1], [0, 1, 2]])},
                              non_tensors={"uid": np.array(["a", "b"], dtype=object)})
    responses = pad_responses([[11, 2], [12, 13, 14, 15, 16, 17]], 4, pad_id=0)
    out = build_rollout_batch(prompts, responses, eos_ids=[2], pad_id=0, lengths=torch.tensor([2, 6]))
    assert out.batch["responses"].tolist() == [[11, 2, 0, 0], [12, 13, 14, 15]]
    assert out.batch["response_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert out.batch["position_ids"].tolist() == [[0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6]]
    assert list(out.non_tensor_batch["uid"]) == ["a", "b"]


def test_n_samples_interleaved_with_non_tensors(tok, model):
    prompts = make_prompt_batch(tok, TEXTS[:2])
    prompts.non_tensor_batch["uid"] = np.array(["p0", "p1"], dtype=object)
    rollout = HFRollout(model, tok, from_dict(RolloutConfig, {"response_length": 5, "n": 3, "temperature": 1.0, "do_sample": True}))
    out = rollout.generate_sequences(prompts)
    assert len(out) == 6
    assert list(out.non_tensor_batch["uid"]) == ["p0"] * 3 + ["p1"] * 3
    assert torch.equal(out.batch["prompts"][:3], prompts.batch["input_ids"][[0, 0, 0]])
    assert out.meta_info["temperature"] == 1.0 and out.meta_info["do_sample"] is True
    assert "rollout_n" not in out.meta_info
    # temperature-1 samples from a near-uniform 4k-token model differ between the 3 copies
    assert len({tuple(r.tolist()) for r in out.batch["responses"][:3]}) > 1


def test_micro_batches_give_the_same_greedy_rollout(tok, model):
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"validate": True})
    whole = HFRollout(model, tok, from_dict(RolloutConfig, {"response_length": 6})).generate_sequences(prompts)
    parts = HFRollout(model, tok, from_dict(RolloutConfig, {"response_length": 6, "micro_batch_size": 1})).generate_sequences(prompts)
    assert torch.equal(whole.batch["responses"], parts.batch["responses"])


def test_seeded_sampling_reproducible_and_validation_greedy(tok, model):
    rollout = HFRollout(model, tok, from_dict(RolloutConfig, {"response_length": 5, "n": 2, "val_kwargs": {"temperature": 0.0}}))
    a = rollout.generate_sequences(make_prompt_batch(tok, TEXTS, meta_info={"seed": 7}))
    b = rollout.generate_sequences(make_prompt_batch(tok, TEXTS, meta_info={"seed": 7}))
    assert torch.equal(a.batch["responses"], b.batch["responses"])
    v1 = rollout.generate_sequences(make_prompt_batch(tok, TEXTS, meta_info={"validate": True}))
    top1 = rollout.generate_sequences(make_prompt_batch(tok, TEXTS, meta_info={"top_k": 1, "n": 1}))
    assert torch.equal(v1.batch["responses"], top1.batch["responses"])  # top-k = 1 sampling is greedy


def test_greedy_tokens_are_argmax_of_scoring_forward(tok, model):
    """KV-cached decoding and the actor's full forward (same position ids / masks) agree."""
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"validate": True})
    out = HFRollout(model, tok, from_dict(RolloutConfig, {"response_length": 6})).generate_sequences(prompts)
    with torch.no_grad():
        logits = model(input_ids=out.batch["input_ids"], attention_mask=out.batch["attention_mask"],
                       position_ids=out.batch["position_ids"]).logits[:, -7:-1]
    mask = out.batch["response_mask"].bool()
    assert torch.equal(logits.argmax(-1)[mask], out.batch["responses"][mask])


def test_filter_logits_hand_example():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7)).tolist()
    assert kept == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    kept = torch.isfinite(filter_logits(logits, top_p=0.5)).tolist()
    assert kept == [[True, False, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=3)).tolist()
    assert kept == [[True, True, True, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=1e-9)).tolist()
    assert kept == [[True, False, False, False]]  # never empty


def test_resolve_sampling():
    cfg = {"temperature": 0.9, "n": 4, "top_p": 0.95, "val_kwargs": {"temperature": 0.0, "n": 3, "do_sample": False}}
    train = resolve_sampling(from_dict(RolloutConfig, cfg), {})
    assert (train.temperature, train.n, train.top_p, train.greedy) == (0.9, 4, 0.95, False)
    val = resolve_sampling(from_dict(RolloutConfig, cfg), {"validate": True})
    assert val.greedy and val.n == 1
    assert resolve_sampling(from_dict(RolloutConfig, cfg), {"temperature": 0.5}).temperature == 0.5


def test_missing_prompt_keys_rejected(tok, model):
    rollout = HFRollout(model, tok, from_dict(RolloutConfig, {"response_length": 2}))
    with pytest.raises(KeyError, match="position_ids"):
        rollout.generate_sequences(Batch.from_dict({"input_ids": torch.ones(1, 2, dtype=torch.long),
                                                    "attention_mask": torch.ones(1, 2, dtype=torch.long)}))
    with pytest.raises(ValueError, match="response_length"):
        HFRollout(model, tok, RolloutConfig(response_length=0))


def test_sampling_matches_distribution():
    """Seeded draws follow softmax(logits / T) restricted by top-k (frequencies within 0.01)."""
    from deepretrieval.workers.rollout.base import SamplingParams
    from deepretrieval.workers.rollout.hf import sample_next_token

    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = torch.log(probs).expand(40000, 4).clone()
    gen = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits * 2.0, SamplingParams(temperature=2.0), gen)
    torch.testing.assert_close(torch.bincount(draws, minlength=4) / 40000.0, probs, atol=0.01, rtol=0)
    draws = sample_next_token(logits, SamplingParams(temperature=1.0, top_k=2), gen)
    torch.testing.assert_close(torch.bincount(draws, minlength=4) / 40000.0, torch.tensor([0, 0, 3 / 7, 4 / 7]), atol=0.01, rtol=0)
