"""Output heads beside the language-model head: a scalar head for reward and value models, and
BERT's masked-LM transform and next-sentence-prediction head (Devlin et al. 2019)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers import ACTIVATIONS, Linear


class ScalarHead(nn.Module):
    """One number per position from the final hidden states (B, T, d_model) -> (B, T).

    A reward model reads it at the last real token of a sequence (InstructGPT, Ouyang et al.
    2022: the LM's unembedding replaced by a projection to a scalar); a PPO value head reads
    it at every response token. The projection starts at zero, so every reward and value
    starts at 0 (its bias): a fresh head adds no noise to what the model computes."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values (B, T) at each row's last real token, for right-padded rows (mask 1 = real)."""
    last = attention_mask.long().sum(-1).clamp(min=1) - 1
    return values.gather(1, last[:, None]).squeeze(1)


class MLMTransform(nn.Module):
    """BERT's masked-LM transform before the (tied) output layer: dense, activation, LayerNorm
    (Devlin et al. 2019; the activation is the MLP's, a gated MLP's gate activation)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = Linear(config.d_model, config.d_model, bias=config.bias)
        self.act = ACTIVATIONS[config.mlp]
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))


class NSPHead(nn.Module):
    """Next-sentence prediction (Devlin et al. 2019): the [CLS] state through the pooler
    (dense + tanh), then a 2-way classifier; (B, d_model) -> (B, 2) logits, 0 = is next."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pooler = Linear(config.d_model, config.d_model, bias=config.bias)
        self.classifier = Linear(config.d_model, 2, bias=config.bias)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(cls_hidden)))
