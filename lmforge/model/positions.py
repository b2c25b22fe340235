"""Position encodings: rotary (RoPE, Su et al. 2021) and learned absolute (GPT-2)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for RoPE in the "rotate half" layout used by Llama/GPT-NeoX.

    Dimension i of the first half is paired with dimension i of the second half and rotated by
    angle pos * theta^(-2i/d). The tables are stored full width, cos as [cos, cos] and sin as
    [-sin, sin], so applying them is one multiply-add per tensor (the decode step runs it 30+
    times a token).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the tables in fp32, e.g. after the model was built on the meta device."""
        device = self.cos.device
        dims = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / self.theta ** (dims / self.head_dim)
        pos = torch.arange(self.max_seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(pos, inv_freq)
        cos, sin = angles.cos(), angles.sin()
        self.cos, self.sin = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin of shape (B or 1, 1, T, head_dim) for position ids (B or 1, T)."""
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by RotaryEmbedding's tables (B, 1, T, D):
    [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin)
