"""Optimizers, learning-rate schedules and batch-size ramp-up (seed 002, 4.3.1; seed 003, 3.2.2).

AdamW with warm-up and cosine decay to ~10% is the survey's default recipe; Adafactor, LAMB,
8-bit AdamW and Lion are the memory- or batch-size-motivated alternatives it lists.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.adamw8bit import AdamW8bit

OPTIMIZERS = ("adamw", "adafactor", "lamb", "adamw8bit", "lion")
SCHEDULES = ("cosine", "wsd", "constant")


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
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    per_tensor: bool = False,
) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters) where the device has it;
    per_tensor: one tensor at a time (for a mix of DTensor and plain parameters)."""
    groups = param_groups(model, weight_decay)
    if per_tensor:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def make_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    per_tensor: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer called `name` over `model`'s trainable parameters (decay on matrices only).

    per_tensor: no multi-tensor kernels, which refuse a mix of DTensor and plain parameters
    (tensor parallel shards some weights and replicates the rest)."""
    if name == "adamw":
        return make_adamw(model, lr, weight_decay, betas, eps, per_tensor)
    groups = param_groups(model, weight_decay)
    if name == "adafactor":
        # torch's Adafactor follows Shazeer & Stern 2018: factored second moments for matrices
        # (row and column means), no first moment, relative step size max(eps2, RMS(p)) * lr.
        # Its eps is (eps1, eps2) with eps1 = None meaning "machine epsilon of the dtype".
        return torch.optim.Adafactor(groups, lr=lr, eps=(None, 1e-3), foreach=not per_tensor)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw8bit":
        return AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, Alg. 2): the AdamW update of each tensor rescaled by the trust ratio
    ||p|| / ||update||, so every layer moves by a similar fraction of its norm at large batches."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                # Trust ratio 1 where either norm is zero (fresh zero-init tensors, zero grads).
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                p.sub_(group["lr"] * trust * update)
        return loss


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, Alg. 2): the sign of an interpolated momentum, one state per weight.
    Its updates have unit size per element, so it wants a 3-10x smaller lr than AdamW."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                m.lerp_(p.grad, 1 - beta2)
        return loss


# ---- learning-rate schedules -------------------------------------------------------------------
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


def wsd_schedule(
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    decay_fraction: float,
) -> float:
    """Warm-up, stable, decay (MiniCPM, Hu et al. 2024): linear warm-up, the peak held, then a
    linear decay to min_lr_ratio * peak_lr over the last decay_fraction of the steps. A run can be
    extended from any stable-phase checkpoint, which cosine's step-dependent lr does not allow."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return peak_lr
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return peak_lr * (1.0 - (1.0 - min_lr_ratio) * progress)


def constant_schedule(step: int, *, peak_lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then peak_lr for good."""
    return peak_lr * (step + 1) / warmup_steps if step < warmup_steps else peak_lr


def learning_rate(
    schedule: str,
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    decay_fraction: float,
) -> float:
    """The lr of optimizer step `step` (0-based) under the named schedule."""
    if schedule == "cosine":
        return cosine_schedule(
            step,
            peak_lr=peak_lr,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            min_lr_ratio=min_lr_ratio,
        )
    if schedule == "wsd":
        return wsd_schedule(
            step,
            peak_lr=peak_lr,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            min_lr_ratio=min_lr_ratio,
            decay_fraction=decay_fraction,
        )
    if schedule == "constant":
        return constant_schedule(step, peak_lr=peak_lr, warmup_steps=warmup_steps)
    raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def ramped_micro_batches(
    tokens_seen: int, *, full: int, start: int, ramp_tokens: int, granule: int
) -> int:
    """Batch-size ramp-up by tokens (GPT-3, Brown et al. 2020, App. B: linear growth from a small
    batch to the full one over the first few billion tokens): micro-batches per process for the
    step after `tokens_seen`, where one `granule` is one micro-batch on every data rank.

    full and start are global batch sizes in sequences; the result is at least 1."""
    if ramp_tokens <= 0 or start >= full or tokens_seen >= ramp_tokens:
        return full // granule
    size = start + (full - start) * tokens_seen / ramp_tokens
    return max(1, int(size) // granule)
