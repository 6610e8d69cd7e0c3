"""No-repeat n-gram decoding (workers.rollout.no_repeat): the blocker against a brute-force scan, the HF rollout
against a reference loop that recomputes everything each step, and the eval method's wiring."""

import random

import pytest
import torch

from deepretrieval.models.tiny import load_tiny_tokenizer, make_prompt_batch, make_tiny_qwen2
from deepretrieval.workers.config import RolloutConfig, from_dict
from deepretrieval.workers.rollout import HFRollout
from deepretrieval.workers.rollout.base import SamplingParams, resolve_sampling
from deepretrieval.workers.rollout.no_repeat import NGramBlocker, format_token_sequences
from deepretrieval.workers.rollout.vllm import vllm_sampling_kwargs

pytestmark = pytest.mark.usefixtures("single_thread")

R = 24
PAD = 0
TEXTS = ["diabetes trials", "heart", "screening for colorectal cancer in adults over fifty"]


def brute_banned(history, n, never=(), exempt=()):
    """Every token t such that history + [t] ends with an n-gram that occurs earlier in history, except the
    tokens t with which history + [t] ends with a prefix of an exempt sequence."""
    if len(history) < n - 1:
        return set()
    tail = tuple(history[len(history) - n + 1:]) if n > 1 else ()
    grams = [tuple(history[i:i + n]) for i in range(len(history) - n + 1)]
    banned = {g[-1] for g in grams if g[:-1] == tail} - set(never)
    extended = [list(history) + [t] for t in banned]
    return {s[-1] for s in extended
            if not any(s[len(s) - k:] == list(e[:k]) for e in exempt for k in range(1, min(len(e), len(s)) + 1))}


def repeats(seq, n):
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def test_blocker_by_hand():
    b = NGramBlocker(2, rows=1)
    for t in (5, 7, 5):
        b.add(0, t)
    assert b.banned(0) == {7}  # "5 7" was written: after 5, 7 is banned
    b.add(0, 9)
    assert b.banned(0) == set()  # nothing has followed 9
    one = NGramBlocker(1, rows=1)
    for t in (3, 4):
        one.add(0, t)
    assert one.banned(0) == {3, 4}
    tri = NGramBlocker(3, rows=1)
    for t in (1, 2, 1, 2):
        tri.add(0, t)
    assert tri.banned(0) == {1}  # "1 2 1" was written
    assert NGramBlocker(2, rows=1, never=[7]).banned(0) == set()
    with pytest.raises(ValueError, match=">= 1"):
        NGramBlocker(0, rows=1)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("exempt", [(), ((1, 2, 3),), ((0, 1), (2, 2, 0, 3))], ids=["plain", "one", "two"])
def test_blocker_matches_brute_force(n, exempt):
    rng = random.Random(n)
    for _ in range(50):
        seq = [rng.randrange(5) for _ in range(rng.randrange(0, 30))]
        b = NGramBlocker(n, rows=2, never=[4], exempt=exempt)
        for i, t in enumerate(seq):
            assert b.banned(1) == brute_banned(seq[:i], n, never=[4], exempt=exempt)
            b.add(1, t)
        assert b.banned(1) == brute_banned(seq, n, never=[4], exempt=exempt) and b.banned(0) == set()


def test_the_answer_can_close_its_tag(tok):
    """`</answer>` repeats the bigram `answer >` of `<answer>`: banned without the exemption, writable with it;
    the query's own repeats stay banned."""
    ids = tok.encode('<answer>{"query": "knee OR pain OR knee', add_special_tokens=False)
    close = tok.encode("</answer>", add_special_tokens=False)
    seqs = format_token_sequences(tok)
    assert tuple(close) in seqs and tuple(tok.encode("<answer>", add_special_tokens=False)) in seqs
    plain, tags = NGramBlocker(2, rows=1), NGramBlocker(2, rows=1, exempt=seqs)
    for t in ids + close[:-1]:
        plain.add(0, t)
        tags.add(0, t)
    assert close[-1] in plain.banned(0) and close[-1] not in tags.banned(0)
    knee = NGramBlocker(2, rows=1, exempt=seqs)
    for t in ids[:-1]:
        knee.add(0, t)
    assert ids[-1] in knee.banned(0)  # ` OR` then ` knee` again: still banned


def test_mask_touches_only_live_rows():
    b = NGramBlocker(2, rows=2)
    for row in (0, 1):
        for t in (1, 2, 1):
            b.add(row, t)
    logits = torch.zeros(3, 4)
    # decoding row 0 -> output row 1 (live), row 1 -> output row 0 (finished), row 2 -> scratch row 2
    out = b.mask(logits, owner=[1, 0, 2], finished=[False, True, False])
    assert out[0, 2] == float("-inf") and torch.isfinite(out[0, [0, 1, 3]]).all()
    assert torch.isfinite(out[1:]).all() and torch.isfinite(logits).all()  # the input is not changed


@pytest.fixture(scope="module")
def model(tok):
    return make_tiny_qwen2(tok, hidden_size=64, seed=3, initializer_range=0.15).eval()  # one greedy row loops


_TAGS = []  # the tiny tokenizer's answer-tag sequences, computed once


def _tags():
    if not _TAGS:
        _TAGS.extend(format_token_sequences(load_tiny_tokenizer()))
    return _TAGS


class _Tok:
    def __init__(self, eos, pad):
        self.eos_token_id, self.pad_token_id = eos, pad

    @staticmethod
    def encode(text, add_special_tokens=False):
        return load_tiny_tokenizer().encode(text, add_special_tokens=add_special_tokens)


def _rollout(model, eos_ids, hf=None):
    rollout = HFRollout(model, _Tok(eos_ids[0], PAD), from_dict(RolloutConfig, {"response_length": R, "hf": hf or {}}))
    rollout.eos_ids = list(eos_ids)
    rollout.static_min_rows = 1
    return rollout


@torch.no_grad()
def _reference_greedy(model, prompts, n, eos_ids):
    """Greedy without a KV cache: the whole sequence re-run every step, the brute-force ban applied."""
    out = []
    for ids, mask in zip(prompts.batch["input_ids"], prompts.batch["attention_mask"]):
        seq = ids[mask.bool()].tolist()
        resp = []
        for _ in range(R):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            if n:
                banned = sorted(brute_banned(resp, n, never=eos_ids, exempt=_tags()))
                logits[banned] = float("-inf")
            token = int(logits.argmax())
            resp.append(token)
            seq.append(token)
            if token in eos_ids:
                break
        out.append(resp)
    return out


def _responses(batch):
    return [row[m.bool()].tolist() for row, m in zip(batch.batch["responses"], batch.batch["response_mask"])]


@pytest.fixture(scope="module")
def references(tok, model):
    """(plain greedy, no-repeat greedy) responses of the reference loop; no row ends early (EOS -1), so every
    response runs R tokens, where loops show."""
    plain = _reference_greedy(model, make_prompt_batch(tok, TEXTS), 0, [-1])
    return plain, _reference_greedy(model, make_prompt_batch(tok, TEXTS), 2, [-1])


@pytest.mark.parametrize("hf", [{}, {"compact_every": 1}, {"compact_every": 3, "cache": "static"}],
                         ids=["plain", "compact1", "static-compact3"])
def test_greedy_no_repeat_equals_the_reference_loop(tok, model, references, hf):
    plain, blocked = references
    assert any(repeats(r, 2) for r in plain)  # the test means something: plain greedy repeats bigrams
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"validate": True, "no_repeat_ngram_size": 2})
    got = _responses(_rollout(model, [-1], hf).generate_sequences(prompts))
    assert got == blocked and got != plain
    assert not any(repeats(r, 2) for r in got)


def test_sampled_no_repeat_is_reproducible_under_compaction(tok, model):
    prompts = make_prompt_batch(tok, TEXTS, meta_info={"n": 4, "seed": 7, "no_repeat_ngram_size": 2})
    outs = [_responses(_rollout(model, [-1], hf).generate_sequences(prompts))
            for hf in ({}, {"compact_every": 2, "shared_prefill": True})]
    assert outs[0] == outs[1] and len(outs[0]) == 12
    assert not any(repeats(r, 2) for r in outs[0])


def test_sampling_params_and_vllm_refusal():
    cfg = from_dict(RolloutConfig, {"response_length": 8})
    assert resolve_sampling(cfg, {}).no_repeat_ngram_size == 0
    assert resolve_sampling(cfg, {"validate": True, "no_repeat_ngram_size": 3}).no_repeat_ngram_size == 3
    with pytest.raises(ValueError, match=">= 0"):
        resolve_sampling(cfg, {"no_repeat_ngram_size": -1})
    with pytest.raises(ValueError, match="hf rollout"):
        vllm_sampling_kwargs(SamplingParams(no_repeat_ngram_size=2), 8, [0])
    assert "no_repeat_ngram_size" not in vllm_sampling_kwargs(SamplingParams(), 8, [0])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from deepretrieval.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_model_method_spec_and_backend(tiny_dir, monkeypatch):
    from deepretrieval.eval import methods

    plain = methods.ModelMethod(tiny_dir, backend="hf")
    blocked = methods.ModelMethod(tiny_dir, backend="hf", no_repeat_ngram_size=2)
    assert "no_repeat_ngram_size" not in plain.spec()  # records written before the option keep their spec
    assert blocked.spec()["no_repeat_ngram_size"] == 2
    # records decoded before the answer tags were exempt are not taken for this rule's
    assert blocked.spec()["no_repeat_rule"] == "response only; answer tags exempt"
    monkeypatch.setattr(methods, "vllm_available", lambda: True)  # the refusal comes before any vllm import
    with pytest.raises(ValueError, match="hf backend"):
        methods.ModelMethod(tiny_dir, backend="vllm", no_repeat_ngram_size=2)
