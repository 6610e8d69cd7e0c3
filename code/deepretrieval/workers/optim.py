"""Optimiser and learning-rate schedule from an `optim` config section (verl key names).

Schedule, with ``w`` warm-up steps and ``T`` total steps (one step = one training iteration, stepped
by the worker after each ``update_policy`` / ``update_critic``)::

    lr(s) = lr * (s + 1) / w                        for s < w        (linear warm-up)
    constant:  lr(s) = lr                           for s >= w
    cosine:    lr(s) = lr * (m + (1 - m) * 0.5 * (1 + cos(pi * (s - w) / (T - w))))   for s >= w

where ``m = min_lr_ratio``. ``w = lr_warmup_steps`` when it is >= 0, else ``int(lr_warmup_steps_ratio * T)``.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from deepretrieval.workers.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with `lr`, `betas`, `weight_decay` from `optim_cfg` and eps 1e-8 (only trainable parameters)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    betas = tuple(float(b) for b in optim_cfg.betas)
    return torch.optim.AdamW(params, lr=float(optim_cfg.lr), betas=betas, weight_decay=float(optim_cfg.weight_decay),
                             eps=1e-8)


def num_warmup_steps(optim_cfg: OptimConfig, total_steps: Optional[int]) -> int:
    steps = optim_cfg.lr_warmup_steps
    if steps is not None and int(steps) >= 0:
        return int(steps)
    ratio = float(optim_cfg.lr_warmup_steps_ratio)
    if ratio > 0 and (total_steps is None or total_steps <= 0):
        raise ValueError("lr_warmup_steps_ratio needs total_training_steps > 0")
    return int(ratio * total_steps) if ratio > 0 else 0


def lr_multiplier(step: int, warmup_steps: int, total_steps: Optional[int], style: str = "constant",
                  min_lr_ratio: float = 0.0) -> float:
    """The factor applied to the base learning rate at (0-based) optimiser step `step`."""
    if step < warmup_steps:
        return float(step + 1) / float(max(1, warmup_steps))
    if style == "constant":
        return 1.0
    if style == "cosine":
        if not total_steps or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, float(step - warmup_steps) / float(total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown warmup_style {style!r} (constant | cosine)")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig,
                       total_steps: Optional[int] = None) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR implementing the warm-up + constant/cosine schedule above.

    `total_steps` defaults to `optim_cfg.total_training_steps` (negative/None = unknown, fine for the
    constant style with `lr_warmup_steps`).
    """
    if total_steps is None:
        total_steps = int(optim_cfg.total_training_steps)
    total = total_steps if total_steps and total_steps > 0 else None
    warmup = num_warmup_steps(optim_cfg, total)
    style = str(optim_cfg.warmup_style)
    min_lr_ratio = float(optim_cfg.min_lr_ratio)
    lr_multiplier(0, warmup, total, style, min_lr_ratio)  # validates `style` now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, warmup, total, style, min_lr_ratio)
    )


def clip_grad_and_step(params: list, optimizer: torch.optim.Optimizer, grad_clip: Optional[float]) -> tuple:
    """Clip the global gradient norm to `grad_clip` (None/<=0: measure only) and step the optimiser.

    Returns ``(grad_norm, stepped)``. A non-finite norm (inf/nan gradients, e.g. from an fp overflow)
    skips the step and clears the gradients, so one bad batch cannot poison the weights or Adam state.
    """
    max_norm = float(grad_clip) if grad_clip is not None and float(grad_clip) > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
    if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    norm = float(grad_norm)
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return norm, False
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, True


class LazyOptimizerMixin:
    """`optimizer` / `lr_scheduler` built from `self.config.optim` on first use, so a worker that
    only computes log-probs or values never allocates Adam state. Expects `self.model`,
    `self.config`, `self._optimizer` and `self._lr_scheduler`."""

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = build_optimizer(self.model.parameters(), self.config.optim)
        return self._optimizer

    @property
    def lr_scheduler(self):
        if self._lr_scheduler is None:
            self._lr_scheduler = build_lr_scheduler(self.optimizer, self.config.optim)
        return self._lr_scheduler
