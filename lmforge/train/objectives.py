"""Training objectives: a function (model, batch) -> mean loss. Only causal LM for now."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def causal_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy, mean over targets that are not IGNORE_INDEX (seed 002, 4.2.3)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(
        logits.view(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=IGNORE_INDEX
    )
