"""Optimizer and learning-rate schedule (seed 002, 4.3.1: AdamW, warm-up, cosine decay to ~10%)."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights) only; biases and norm gains are left alone,
    since shrinking them toward zero only fights the normalization (as in GPT-2/nanoGPT)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters) where the device has it."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def cosine_schedule(
    step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> float:
    """Linear warm-up to peak_lr over warmup_steps, then cosine decay to min_lr_ratio * peak_lr
    at total_steps (the survey: decay to about 10% of the maximum)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    min_lr = min_lr_ratio * peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
