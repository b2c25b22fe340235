"""Multi-head / grouped-query / multi-query attention, attention masks and the KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers import Linear
from lmforge.model.positions import apply_rotary

# torch >= 2.5 lets SDPA broadcast K/V heads itself (no copy); older versions need an expand.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class KVCache:
    """Keys and values of past positions for incremental decoding, for all layers at once.

    Preallocated as (n_layers, batch, kv_heads, max_len, head_dim); `length` positions are
    filled. The model writes new keys/values with `update` and advances `length` after the
    last layer, so the cache is state passed in and out of `forward`, never kept in modules.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_len = max_len or config.max_seq_len
        shape = (config.n_layers, batch_size, config.kv_heads, self.max_len, config.dim_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store (B, KV, T, D) new keys/values after the filled part; return all keys/values."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. drop finished sequences)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]


class SlotKVCache:
    """Keys and values for up to `slots` independent sequences, each at its own length.

    Allocated once as two (n_layers, slots, kv_heads, max_len, head_dim) tensors, so memory is
    bounded by 2 * n_layers * slots * max_len * kv_heads * head_dim elements and never grows.
    `lengths` (host ints) counts the filled positions of each slot; a forward pass works on a
    `SlotBatch` of contiguous slots, which is a view (no copy) of these tensors.
    """

    def __init__(
        self,
        config: ModelConfig,
        slots: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_len = max_len or config.max_seq_len
        shape = (config.n_layers, slots, config.kv_heads, self.max_len, config.dim_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * slots

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def batch(self, start: int, stop: int) -> SlotBatch:
        """Slots [start, stop) as one batch for a forward pass."""
        return SlotBatch(self, start, stop)

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` (its filled part) into slot `dst`, e.g. to keep active slots
        contiguous after `dst` finished."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n


class SlotBatch:
    """The KVCache interface over slots [start, stop) of a SlotKVCache: row b writes its new keys
    at its own length and attends to its own past only. `length` is the attention window
    before the new tokens (the longest slot), like a left-padded KVCache's; `advance` adds to
    every row's length."""

    def __init__(self, cache: SlotKVCache, start: int, stop: int) -> None:
        self.cache, self.start, self.stop = cache, start, stop
        host = cache.lengths[start:stop]
        self.lengths = torch.tensor(host, device=cache.k.device)
        # Rows of one length write with a slice and need no mask beyond plain causal.
        self.uniform = len(set(host)) == 1
        self.length = max(host)

    @property
    def batch_size(self) -> int:
        return self.stop - self.start

    def positions(self, q_len: int) -> torch.Tensor:
        """(B, q_len) position ids of the new tokens."""
        return self.lengths[:, None] + torch.arange(q_len, device=self.lengths.device)

    def mask(self, q_len: int) -> torch.Tensor | None:
        """(B, 1, q_len, window) boolean mask (True = attend), or None where plain causal
        attention is right, so SDPA keeps its fast path."""
        if self.uniform:
            return build_mask(q_len, self.length, None, self.lengths.device)
        window = torch.arange(self.length + q_len, device=self.lengths.device)
        return (window[None, None, :] <= self.positions(q_len)[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store (B, KV, T, D) new keys/values at each row's length; return the window."""
        end = self.length + k.shape[2]
        keys = self.cache.k[layer, self.start : self.stop]
        values = self.cache.v[layer, self.start : self.stop]
        if self.uniform:
            keys[:, :, self.length : end] = k
            values[:, :, self.length : end] = v
        else:
            # Advanced indices on dims 0 and 2 put the (B, T) index shape first: (B, T, KV, D).
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            at = self.positions(k.shape[2])
            keys[rows, :, at] = k.transpose(1, 2)
            values[rows, :, at] = v.transpose(1, 2)
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        lengths = self.cache.lengths
        for slot in range(self.start, self.stop):
            lengths[slot] += n


def build_mask(
    q_len: int, past: int, key_padding: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean attention mask (True = attend) of shape (B or 1, 1, q_len, past + q_len).

    Returns None when plain causal attention (or none, for one new token) is what is needed,
    so SDPA can take its fastest path.
    """
    total = past + q_len
    if key_padding is None and (q_len == 1 or past == 0):
        return None
    q_pos = torch.arange(past, total, device=device)[:, None]
    allowed = torch.arange(total, device=device)[None, :] <= q_pos  # (T, S) causal
    if key_padding is None:
        return allowed[None, None]
    allowed = allowed[None] & key_padding[:, None, :].bool()
    # A padded query would attend to nothing (NaN in softmax); let it see itself instead.
    allowed = allowed | (torch.arange(total, device=device)[None, :] == q_pos)[None]
    return allowed[:, None]


class Attention(nn.Module):
    """Causal self-attention with fused QKV projection and n_kv_heads <= n_heads (GQA/MQA)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.kv_heads, self.head_dim = (
            config.n_heads,
            config.kv_heads,
            config.dim_head,
        )
        qkv_out = (self.n_heads + 2 * self.kv_heads) * self.head_dim
        self.qkv = Linear(config.d_model, qkv_out, bias=config.has_qkv_bias)
        self.out = Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV = self.n_heads, self.kv_heads
        # One (B, heads, T, D) view of the fused projection; q and k heads are adjacent, so a
        # single rotary call turns both (half the small ops of a decode step's attention).
        qkv = self.qkv(x).view(B, T, H + 2 * KV, self.head_dim).transpose(1, 2)
        qk, v = qkv[:, : H + KV], qkv[:, H + KV :]
        if rope is not None:
            qk = apply_rotary(qk, *rope)
        q, k = qk[:, :H], qk[:, H:]
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)
        gqa = {}
        if self.kv_heads != self.n_heads:
            if _SDPA_GQA:
                gqa = {"enable_gqa": True}
            else:
                rep = self.n_heads // self.kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1 and past == 0,
            **gqa,
        )
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
