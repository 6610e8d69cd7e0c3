"""Masked reductions used by the RL algorithms.

``mask`` is a 0/1 (or bool) tensor broadcastable to ``values``; only positions with ``mask != 0``
contribute. Values at masked positions are never read arithmetically (they may be ``nan``/``inf``
padding), so every reduction selects with ``torch.where`` rather than multiplying by the mask.
"""

from __future__ import annotations

import torch

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten", "clip_by_value"]


def _select(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    r"""sum_{i: m_i=1} x_i  (over ``dim``, or over everything when ``dim`` is None)."""
    selected = _select(values, mask)
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    r"""mean_m(x) = sum_i m_i x_i / max(sum_i m_i, 1).

    An empty mask gives 0 (not nan), so a batch with no valid token contributes a zero loss.
    """
    mask = mask.bool()
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    count = count.to(values.dtype).clamp(min=1)
    return masked_sum(values, mask, dim) / count


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    r"""var_m(x) = sum_i m_i (x_i - mean_m(x))^2 / (N - 1)   with N = sum_i m_i  (unbiased),
    or divided by N when ``unbiased=False``.

    The Bessel correction needs N >= 2; with N <= 1 the biased value (0) is returned instead of
    dividing by zero.
    """
    mask = mask.bool()
    mean = masked_mean(values, mask)
    centered = values - mean
    var = masked_mean(centered * centered, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * (n.to(values.dtype) / (n.to(values.dtype) - 1))
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    r"""whiten_m(x) = (x - mean_m(x)) / sqrt(var_m(x) + eps)   (unbiased var over the mask);
    with ``shift_mean=False`` the mean is added back: (x - mu)/sigma + mu.

    Positions outside the mask are transformed with the same affine map (callers mask them).
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def clip_by_value(x: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float) -> torch.Tensor:
    r"""min(max(x, low), high) elementwise; ``low``/``high`` may be tensors."""
    return torch.maximum(torch.minimum(x, torch.as_tensor(high, dtype=x.dtype, device=x.device)),
                         torch.as_tensor(low, dtype=x.dtype, device=x.device))
