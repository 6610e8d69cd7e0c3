"""The `self` warm-up: what the base model consistently answers, put in the answer format.

A format warm-up on random word subsets of the input (`random_words`) teaches the answer block, but it
also teaches *copying*: afterwards the policy samples the input's own words, so the reward can only
choose among them, and a patient case's words miss what finds its trials (the conditions' names: GPT-4's
condition lists more than double the case's recall, docs/recipe.md). This warm-up distils what the model
already knows instead (self-consistency, as in self-training without labels):

    1. ask the untrained model a plain question about each *training* input, in its own chat format
       (`SELF_QUESTIONS`: the likely conditions of a patient, the terms of a review's topic);
    2. sample `SELF_SAMPLES` free-text answers per input (temperature 1, top-k 50: transformers'
       default; seeded);
    3. keep the words (search.text.bag_of_words: stop words dropped) that at least `SELF_MIN_COUNT` of
       an input's answers contain — one sample's invention is dropped, what the model says again kept —
       and that the answers of at most `SELF_MAX_SHARE` of the inputs contain (the question's echo,
       "patient", "likely", "condition", is in every input's answers and finds nothing);
    4. those words, most repeated first (at most `SELF_MAX_WORDS`), OR-joined, are the input's target,
       with `n - 1` shuffles of the same words; an input with no such word has no target.

No relevance judgement, test topic or baseline query is used: only the training inputs and the model's
own answers. Sampled one at a time the raw answers add little (all 48 trials_sigir patients, recall@100:
the case 0.254, the case OR one raw answer 0.273, OR the consistent words 0.317; scripts/probe_expansion.py),
so the warm-up starts RL from the model's consistent knowledge rather than from its noise.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Dict, List, Optional, Sequence

# the plain question the untrained model answers, per task kind (data.tasks kinds), before the input
SELF_QUESTIONS: Dict[str, str] = {
    "patient_trials": "What medical conditions does this patient most likely have? "
                      "Answer with a short list of condition names.",
    "review_question": "Which medical terms, synonyms and related terms describe the topic of this "
                       "systematic review? Answer with a short list of terms.",
}
SELF_MAX_NEW_TOKENS = 40  # tokens of each free-text answer (a short list)
SELF_SAMPLES = 8  # answers sampled per input
SELF_MIN_COUNT = 2  # a kept word is in at least this many of an input's answers
SELF_MAX_SHARE = 0.25  # ... and in the answers of at most this share of the inputs
SELF_MAX_WORDS = 12  # words of a target (a 64-token response holds them)


def consensus_terms(answers: Sequence[Sequence[str]], min_count: int = SELF_MIN_COUNT,
                    max_share: float = SELF_MAX_SHARE, max_words: int = SELF_MAX_WORDS) -> List[List[str]]:
    """Per input (its sampled answers), the words in >= `min_count` of its answers and in the answers of
    <= `max_share` of all inputs; most repeated first, then in first-seen order; at most `max_words`."""
    from deepretrieval.search.text import bag_of_words

    counts = [Counter(w for answer in per_input for w in bag_of_words(answer)) for per_input in answers]
    inputs_with = Counter(w for c in counts for w in c)
    limit = max_share * len(answers)
    out = []
    for c in counts:  # Counter keeps first-seen order, and most_common sorts stably
        out.append([w for w, n in c.most_common() if n >= min_count and inputs_with[w] <= limit][:max_words])
    return out


def sample_answers(model_path: str, inputs: Sequence[str], task_kind: str, n: int, seed: int,
                   batch_size: int = 8, max_new_tokens: int = SELF_MAX_NEW_TOKENS,
                   question: Optional[str] = None) -> List[List[str]]:
    """`n` sampled free-text answers of the model at `model_path` to the task kind's question (or `question`),
    per input. Deterministic in (`model_path`, `inputs`, `seed`) on one machine (torch's CPU sampling)."""
    import torch
    from transformers import AutoModelForCausalLM

    from deepretrieval.models.tokenizer import load_tokenizer

    if task_kind not in SELF_QUESTIONS:
        raise ValueError(f"the self warm-up has questions for the task kinds {', '.join(SELF_QUESTIONS)}, "
                         f"not {task_kind!r}")
    tokenizer = load_tokenizer(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    question = question or SELF_QUESTIONS[task_kind]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{question}\n\n{text.strip()}"}],
                                             tokenize=False, add_generation_prompt=True) for text in inputs]
    torch.manual_seed(seed)  # the global CPU generator `generate` samples from
    out: List[List[str]] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                                 top_p=1.0, top_k=50, num_return_sequences=n,
                                 pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out.extend(answers[i * n:(i + 1) * n] for i in range(len(answers) // n))
    return out


def self_targets(model_path: str, inputs: Sequence[str], task_kind: str, n: int, seed: int) -> List[List[str]]:
    """The warm-up targets of each input: its consensus words (:func:`consensus_terms` over
    `SELF_SAMPLES` sampled answers) OR-joined, then `n - 1` seeded shuffles of them; [] without any."""
    rng = random.Random(seed)
    out = []
    for words in consensus_terms(sample_answers(model_path, inputs, task_kind, SELF_SAMPLES, seed)):
        targets = [" OR ".join(words)] if words else []
        for _ in range(n - 1 if words else 0):
            targets.append(" OR ".join(rng.sample(words, len(words))))
        out.append(targets)
    return out
