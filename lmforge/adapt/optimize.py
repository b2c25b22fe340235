"""The optimisation shared by the alignment trainers (reward model, DPO, PPO/GRPO): AdamW over
the trainable parameters, linear warm-up then cosine or constant learning rate, gradient
clipping, and one JSON line of metrics per step.

These loops step on pairs or rollouts rather than token windows, so they do not go through
`lmforge.train.Trainer` (whose batches, checkpoints and resume are built around token data);
they reuse its optimizer and schedules."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lmforge.config import field_
from lmforge.errors import LmforgeError
from lmforge.train.optim import learning_rate, make_adamw


@dataclass
class AlignTrainConfig:
    """Optimisation of an alignment run."""

    steps: int = field_(100, "optimizer steps (PPO/GRPO: iterations of rollouts + updates)", ge=1)
    batch_size: int = field_(8, "pairs per step (PPO/GRPO: prompts per rollout batch)", ge=1)
    lr: float = field_(1e-4, "peak learning rate", gt=0)
    schedule: Literal["cosine", "constant"] = field_("cosine", "lr after warm-up")
    warmup_steps: int = field_(5, "linear warm-up steps", ge=0)
    weight_decay: float = field_(0.0, "decoupled weight decay on matrices", ge=0)
    grad_clip: float = field_(1.0, "max global gradient norm (0: off)", ge=0)
    seed: int = field_(0, "seed of data order, sampling and head initialisation")
    device: str = field_("cpu", "cpu, cuda, cuda:N or auto")
    time_limit_s: float = field_(0.0, "stop after this many seconds of training (0: none)", ge=0)


class Stepper:
    """AdamW steps on `module`'s trainable parameters under the config's schedule."""

    def __init__(self, module: nn.Module, config: AlignTrainConfig, total_steps: int) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise LmforgeError("nothing to train: the model has no trainable parameters")
        self.config, self.total = config, total_steps
        self.optimizer = make_adamw(module, config.lr, config.weight_decay, (0.9, 0.95), 1e-8)
        self.step = 0

    def __call__(self, loss: torch.Tensor) -> float:
        """Backward, clip, update; returns the gradient norm before clipping."""
        c = self.config
        lr = learning_rate(
            c.schedule,
            self.step,
            peak_lr=c.lr,
            warmup_steps=c.warmup_steps,
            total_steps=self.total,
            min_lr_ratio=0.1,
            decay_fraction=0.2,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss.backward()
        max_norm = c.grad_clip if c.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if math.isfinite(norm):  # a non-finite gradient would poison AdamW's moments: skip it
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return norm


def log_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
