"""Overlong reward shaping: DAPO's soft overlong punishment (verl's `reward_model.overlong_buffer`).

A response is paid for its search; this subtracts a penalty that grows with its length in the last
`len` tokens before the generation limit:

    expected   = max_response_length - len
    penalty(L) = min(0, -(L - expected) / len * penalty_factor)

so L <= expected costs nothing, and the penalty reaches -penalty_factor at the limit (a response cut
off there also gets the format penalty: it has no closing tag). More OR'ed terms find more, so
without it the answers of the `expand` recipe grow until they are cut off (docs/recipe.md).

Configuration (`reward_model.overlong_buffer`, checked by trainer.config): `enable` (false), `len`
(tokens, 1 <= len < data.max_response_length), `penalty_factor` (>= 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence


@dataclass(frozen=True)
class OverlongBuffer:
    """The shaping of one run: `buffer_len` tokens before `max_response_length` are penalised."""

    buffer_len: int
    penalty_factor: float
    max_response_length: int

    def penalty(self, length: int) -> float:
        """penalty(L) above: 0 up to `max_response_length - buffer_len`, then linear to -penalty_factor."""
        exceed = int(length) - (self.max_response_length - self.buffer_len)
        return min(0.0, -exceed / self.buffer_len * self.penalty_factor)

    @classmethod
    def from_config(cls, section: Optional[Mapping[str, Any]], max_response_length: int) -> Optional["OverlongBuffer"]:
        """The shaping of a validated `reward_model.overlong_buffer` section; None when it is absent or
        disabled."""
        if not section or not section.get("enable"):
            return None
        return cls(int(section["len"]), float(section["penalty_factor"]), int(max_response_length))


def overlong_metrics(penalties: Sequence[float], prefix: str = "reward/") -> Dict[str, float]:
    """`overlong_penalty_mean` (the mean penalty, <= 0) and `overlong_ratio` (the share of responses
    penalised) of one batch."""
    n = len(penalties)
    if n == 0:
        return {}
    return {
        f"{prefix}overlong_penalty_mean": float(sum(penalties)) / n,
        f"{prefix}overlong_ratio": sum(p < 0 for p in penalties) / n,
    }
