"""Training stabilisers (seed 004 "训练策略"; PaLM, Chowdhery et al. 2022, Sec. 5.1).

PaLM saw loss spikes that were not caused by bad data alone but by a batch meeting a particular
parameter state; restarting from a checkpoint ~100 steps before the spike and skipping ~200-500
batches avoided them. Its z-loss, 1e-4 * log^2 Z of the softmax normalizer, keeps log Z near 0.
"""

from __future__ import annotations

import statistics
from collections import deque

import torch
from torch import nn

from lmforge.errors import LmforgeError


class TrainingDivergedError(LmforgeError):
    """The loss or gradient went non-finite, or spiked, more often than the run allows."""


class SpikeDetector:
    """A loss is a spike when it exceeds `factor` times the median of the last `window` accepted
    losses (the median ignores the spike itself and earlier outliers, unlike a mean)."""

    MIN_HISTORY = 5  # too few losses say nothing about the trend (early loss falls fast)

    def __init__(self, factor: float, window: int) -> None:
        self.factor = factor
        self.history: deque[float] = deque(maxlen=window)

    def is_spike(self, loss: float) -> bool:
        if self.factor <= 0 or len(self.history) < min(self.MIN_HISTORY, self.history.maxlen):
            return False
        return loss > self.factor * statistics.median(self.history)

    def accept(self, loss: float) -> None:
        self.history.append(loss)

    def median(self) -> float:
        return statistics.median(self.history) if self.history else float("nan")

    def reset(self) -> None:
        self.history.clear()


class ZLoss:
    """Adds `weight * mean(logsumexp(logits)^2)` of the model's training forward to the loss.

    A forward hook on the model reads its logits, so every objective gets the term without
    being rewritten; `take()` returns the accumulated term and clears it."""

    def __init__(self, model: nn.Module, weight: float) -> None:
        self.weight = weight
        self.pending: torch.Tensor | None = None
        self.handle = model.register_forward_hook(self._hook) if weight > 0 else None

    def _hook(self, module: nn.Module, args, output) -> None:
        if not module.training:
            return
        logits = output[0] if isinstance(output, tuple) else output
        log_z = torch.logsumexp(logits.float(), dim=-1)
        term = self.weight * log_z.pow(2).mean()
        self.pending = term if self.pending is None else self.pending + term

    def take(self) -> torch.Tensor | float:
        term, self.pending = self.pending, None
        return 0.0 if term is None else term
