"""No-repeat n-gram blocking over the response only (a decoding rule for evaluation).

    NGramBlocker(n, rows, never=eos_ids)
        banned(row)   the tokens t that would make the row's response repeat an n-gram it already holds:
                      { t : (r[-(n-1):] + (t,)) occurs in r }, r = the row's response so far (n = 1: every
                      token r holds), never an id of `never`
        add(row, t)   the row's response grows by t
        mask(logits, owner, finished)
                      logits [rows, V] with each live row's banned tokens at -inf (owner: decoding row ->
                      output row, as in the HF rollout's loop; finished rows are left alone)

Every step looks up one (n-1)-gram per row in a dict, so a response of L tokens costs O(L) in all.

Unlike transformers' `no_repeat_ngram_size`, which counts the prompt too, only the response counts here: the
words of the input and the answer tags that the instruction itself shows stay writable. The EOS ids are never
banned, so a row can always end. A greedy policy that loops (`knee OR knee OR knee ...`) cannot with n = 2: the
bigram `OR knee` is written once.

The actor scores the unmodified logits, so samples drawn with a ban are not the policy's own: the rule is for
evaluation (`deepretrieval eval --no-repeat-ngram`, the recipe's `greedy-norepeat` decoding), not for training.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Set, Tuple

import torch


def ngram_size(value) -> int:
    """The option's value as an int (None/0 = off); ValueError for a negative one."""
    n = int(value or 0)
    if n < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {n}")
    return n


class NGramBlocker:
    def __init__(self, n: int, rows: int, never: Iterable[int] = ()):
        if int(n) < 1:
            raise ValueError(f"no_repeat_ngram_size must be >= 1 (0 = off), got {n}")
        self.n = int(n)
        self.never = {int(t) for t in never}
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
        return self.followers[row].get(key, set()) - self.never

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
