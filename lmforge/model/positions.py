"""Position encodings (seed 002, 4.2.2): rotary (RoPE, Su et al. 2021), sinusoidal (Vaswani et al.
2017), T5 relative bias (Raffel et al. 2020) and ALiBi (Press et al. 2022). Learned absolute
positions (GPT-2, BERT) are a plain nn.Embedding in the Transformer."""

from __future__ import annotations

import math

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


def sinusoidal_table(position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. 2017, Sec. 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)) and
    PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), for position ids of any shape -> (..., dim).
    Computed on the fly (cheap next to a block) so it needs no buffer and no checkpoint entry."""
    i = torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device)
    angles = position_ids.float()[..., None] / 10000.0 ** (i / dim)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return table[..., :dim]


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022, Sec. 3): for n a power of two, the geometric
    sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise (as BLOOM does) the n' = 2^floor(log2 n)
    slopes of that sequence, then the first n - n' odd-indexed slopes of the 2n' sequence
    (those falling between the existing ones)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = [2 ** (-8 * k / closest) for k in range(1, closest + 1)]
    extra = [2 ** (-8 * k / (2 * closest)) for k in range(1, 2 * closest + 1, 2)]
    return torch.tensor(slopes + extra[: n_heads - closest])


def alibi_bias(
    n_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool
) -> torch.Tensor:
    """ALiBi's additive score bias -slope_h * distance, (B or 1, H, T, S) for query positions
    (B or 1, T) and key positions (S,). Causal rows see only the past, so the distance is i - j;
    bidirectional attention (encoder, prefix) uses |i - j|."""
    dist = q_pos[:, None, :, None] - k_pos[None, None, None, :]
    dist = dist.clamp(min=0) if causal else dist.abs()
    slopes = alibi_slopes(n_heads).to(q_pos.device)
    return -slopes[None, :, None, None] * dist.float()


def t5_bucket(
    relative: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's relative-position bucket of `relative` = key position - query position (Raffel et
    al. 2020, Sec. 2.1): half the buckets hold exact small distances, the rest grow
    logarithmically up to max_distance, beyond which all distances share the last bucket.
    Bidirectional attention splits the buckets between keys before and after the query;
    causal attention only has keys before it (a later key falls in bucket 0 and is masked)."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    scaled = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    log_bucket = (exact + (scaled * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """T5's learned scalar bias per (bucket, head), added to the attention scores; one module
    per stack, shared by all its layers (Raffel et al. 2020)."""

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bidirectional = bidirectional
        self.embed = nn.Embedding(num_buckets, n_heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(B or 1, H, T, S) bias for query positions (B or 1, T) and key positions (S,)."""
        buckets = t5_bucket(
            k_pos[None, None, :] - q_pos[:, :, None],
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.embed(buckets).permute(0, 3, 1, 2)
