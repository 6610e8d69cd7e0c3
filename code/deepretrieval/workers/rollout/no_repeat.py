"""No-repeat n-gram blocking over the response only (a decoding rule for evaluation).

    NGramBlocker(n, rows, never=eos_ids, exempt=format_token_sequences(tokenizer))
        banned(row)   the tokens t that would make the row's response repeat an n-gram it already holds:
                      { t : (r[-(n-1):] + (t,)) occurs in r }, r = the row's response so far (n = 1: every
                      token r holds), never an id of `never`, and never the next token of an `exempt`
                      sequence that r ends partway into: { E[k] : E in exempt, 0 <= k < len(E), r ends with E[:k] }
        add(row, t)   the row's response grows by t
        mask(logits, owner, finished)
                      logits [rows, V] with each live row's banned tokens at -inf (owner: decoding row ->
                      output row, as in the HF rollout's loop; finished rows are left alone)

Every step looks up one (n-1)-gram per row in a dict, so a response of L tokens costs O(L) in all.

Unlike transformers' `no_repeat_ngram_size`, which counts the prompt too, only the response counts here: the
words of the input and the answer tags that the instruction itself shows stay writable. The EOS ids are never
banned, so a row can always end, and neither are the answer format's tags (`format_token_sequences`): the
closing `</answer>` repeats a bigram of the opening `<answer>` (SmolLM2 writes both `... answer >`), so
without the exemption a greedy answer could not close its tag (a format error, scored 0, though its query was
complete). A greedy policy that loops (`knee OR knee OR knee ...`) cannot with n = 2: the
bigram `OR knee` is written once.

The actor scores the unmodified logits, so samples drawn with a ban are not the policy's own: the rule is for
evaluation (`deepretrieval eval --no-repeat-ngram`, the recipe's `greedy-norepeat` decoding), not for training.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence, Set, Tuple

import torch

from deepretrieval.rewards.parsing import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

# recorded in an evaluation's spec next to the n-gram size, so that records decoded under an earlier rule (before
# 2026-12-03 the tags were not exempt) are not reused as if they were decoded under this one
RULE = "response only; answer tags exempt"
# what precedes a tag in an answer; a tokenizer may merge it with the tag's first characters (`"}</`)
_TAG_CONTEXTS = ("", " ", "\n", '"', '"}', "}")


def ngram_size(value) -> int:
    """The option's value as an int (None/0 = off); ValueError for a negative one."""
    n = int(value or 0)
    if n < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {n}")
    return n


def format_token_sequences(tokenizer: Any) -> List[Tuple[int, ...]]:
    """The answer format's tags (rewards.parsing) as `tokenizer` writes them, alone and after each of
    _TAG_CONTEXTS: a context's own tokens are dropped when the tag's tokens follow them unchanged, kept when
    the tokenizer merged them with the tag (the merged token then starts the sequence)."""
    out: List[Tuple[int, ...]] = []
    for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE):
        for context in _TAG_CONTEXTS:
            ids = [int(t) for t in tokenizer.encode(context + tag, add_special_tokens=False)]
            head = [int(t) for t in tokenizer.encode(context, add_special_tokens=False)] if context else []
            seq = tuple(ids[len(head):] if ids[:len(head)] == head else ids)
            if seq and seq not in out:
                out.append(seq)
    return out


class NGramBlocker:
    def __init__(self, n: int, rows: int, never: Iterable[int] = (), exempt: Iterable[Sequence[int]] = ()):
        if int(n) < 1:
            raise ValueError(f"no_repeat_ngram_size must be >= 1 (0 = off), got {n}")
        self.n = int(n)
        self.never = {int(t) for t in never}
        self.exempt = [tuple(int(t) for t in seq) for seq in exempt if len(seq)]
        self.history: List[List[int]] = [[] for _ in range(rows)]
        # per row: (n-1)-gram -> the tokens that have followed it
        self.followers: List[Dict[Tuple[int, ...], Set[int]]] = [{} for _ in range(rows)]

    def add(self, row: int, token: int) -> None:
        history = self.history[row]
        history.append(int(token))
        if len(history) >= self.n:
            key = tuple(history[len(history) - self.n:-1])
            self.followers[row].setdefault(key, set()).add(history[-1])

    def banned(self, row: int) -> Set[int]:
        history = self.history[row]
        if len(history) < self.n - 1:
            return set()
        key = tuple(history[len(history) - self.n + 1:])
        banned = self.followers[row].get(key, set())
        if not banned:
            return set()
        return banned - self.never - self._continuing(history)

    def _continuing(self, history: List[int]) -> Set[int]:
        """The next token of every exempt sequence that `history` ends partway into (its first token always)."""
        out: Set[int] = set()
        for seq in self.exempt:
            for k in range(min(len(seq), len(history) + 1)):
                if k == 0 or tuple(history[len(history) - k:]) == seq[:k]:
                    out.add(seq[k])
        return out

    def mask(self, logits: torch.Tensor, owner: Sequence[int], finished: Sequence[bool]) -> torch.Tensor:
        rows: List[int] = []
        cols: List[int] = []
        for i, (out_row, done) in enumerate(zip(owner, finished)):
            if done or out_row >= len(self.history):
                continue
            banned = self.banned(out_row)
            rows.extend([i] * len(banned))
            cols.extend(banned)
        if not rows:
            return logits
        logits = logits.clone()
        logits[torch.as_tensor(rows, device=logits.device), torch.as_tensor(cols, device=logits.device)] = float("-inf")
        return logits

    def add_step(self, owner: Sequence[int], tokens: Sequence[int], finished: Sequence[bool]) -> None:
        """Record one decoding step: the token of every row that was still live when it was drawn."""
        for out_row, token, done in zip(owner, tokens, finished):
            if not done and out_row < len(self.history):
                self.add(out_row, token)
