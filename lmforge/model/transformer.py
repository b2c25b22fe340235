"""The Transformer: a pre-norm causal decoder (seed 002, 4.2.1) configured by ModelConfig."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.model.attention import Attention, KVCache, SlotBatch, build_mask
from lmforge.model.config import ModelConfig
from lmforge.model.layers import MLP, Linear, RMSNorm, make_norm
from lmforge.model.positions import RotaryEmbedding


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(Norm(x)), then x + MLP(Norm(x)) (GPT-2, Llama)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout) if config.dropout else None

    def forward(self, x, rope, mask, cache=None):
        h = self.attn(self.attn_norm(x), rope, mask, cache)
        if self.drop is not None:
            h = self.drop(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.drop is not None:
            h = self.drop(h)
        return x + h


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab). Losses live in lmforge.train.objectives."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        if config.position == "learned":
            self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model)
            self.rope = None
        else:
            self.rope = RotaryEmbedding(config.dim_head, config.max_seq_len, config.rope_theta)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere; residual output projections scaled by 1/sqrt(2L)
        so the residual stream's variance does not grow with depth (Radford et al. 2019)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.out, block.mlp.w_out):
                nn.init.normal_(
                    proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers)
                )

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | SlotBatch | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        hidden_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits for `input_ids` (B, T).

        attention_mask: (B, past + T), 1 for real tokens and 0 for (left) padding, covering the
        cached positions too. cache: a KVCache to read past keys from and append to, or a
        SlotBatch, whose rows each have their own length (it supplies positions and the mask).
        logits_to_keep: if > 0, compute logits for the last n positions only (generation).
        return_hidden: also return the final normalized hidden states (B, T, d_model).
        hidden_only: return those hidden states alone and skip the output layer (for a loss that
        applies it chunk by chunk: lmforge.train.objectives.linear_cross_entropy).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds the model's max_seq_len "
                f"{self.config.max_seq_len}"
            )
        if isinstance(cache, SlotBatch):
            if attention_mask is not None:
                raise ValueError("a SlotBatch masks by its slot lengths; give no attention_mask")
            position_ids = cache.positions(T) if position_ids is None else position_ids
        elif position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
        x = self.embed(input_ids)
        rope = None
        if self.rope is not None:
            rope = self.rope(position_ids)
        else:
            x = x + self.pos_embed(position_ids)
        x = self.drop(x)
        if isinstance(cache, SlotBatch):
            mask = cache.mask(T)
        else:
            mask = build_mask(T, past, attention_mask, input_ids.device)
        for block in self.blocks:
            x = block(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        h = self.norm(x)
        if hidden_only:
            return h
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return (logits, h) if return_hidden else logits

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache matching this model's dtype and device."""
        p = self.embed.weight
        return KVCache(self.config, batch_size, max_len, dtype=p.dtype, device=p.device)

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameters counted once (tied weights once). non_embedding drops the token and
        position embedding tables (Kaplan et al. 2020's N); an untied output layer stays."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            if self.rope is None:
                n -= self.pos_embed.weight.numel()
        return n

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: every Linear, including the output layer."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, PaLM (Chowdhery et al. 2022, App. B): 6N + 12*L*H*Dh*T."""
        c = self.config
        T = seq_len or c.max_seq_len
        return 6 * self.matmul_params() + 12 * c.n_layers * c.n_heads * c.dim_head * T
