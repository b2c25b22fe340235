"""Multi-head / grouped-query / multi-query attention (self and cross), attention masks (causal,
prefix, sliding-window, block-sparse) and the KV cache."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers import Linear, make_norm
from lmforge.model.positions import apply_rotary

# torch >= 2.5 lets SDPA broadcast K/V heads itself (no copy); older versions need an expand.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class KVCache:
    """Keys and values of past positions for incremental decoding, for all layers at once.

    Preallocated as (n_layers, batch, kv_heads, max_len, head_dim); `length` positions are
    filled. The model writes new keys/values with `update` and advances `length` after the
    last layer, so the cache is state passed in and out of `forward`, never kept in modules.
    An encoder-decoder's decoder also keeps each layer's cross-attention keys/values of the
    encoder output in `memory_kv` (computed once per sequence).
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
        layers = config.decoder_layers
        shape = (layers, batch_size, config.kv_heads, self.max_len, config.dim_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.memory_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

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
        self.memory_kv = {i: (k[index], v[index]) for i, (k, v) in self.memory_kv.items()}


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


def attention_pattern(
    config: ModelConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """True where query position `q` may attend to key position `k` (broadcasting tensors).

    Written with tensor operations only, so the same function builds dense masks and serves as
    flex_attention's mask_mod. `prefix` (arch "prefix"): keys before it are seen by every query,
    so the prefix attends to itself bidirectionally (Raffel et al. 2020's prefix LM; GLM)."""
    d = q - k
    if config.attention == "sliding":
        # Longformer (Beltagy et al. 2020) / Mistral: each query sees the `window` keys ending
        # at itself (bidirectional: less than `window` away on either side).
        allowed = d.abs() < config.window
    elif config.attention == "block_sparse":
        block = config.sparse_block
        if config.sparse_pattern == "fixed":
            # Child et al. 2019, Sec. 4.3 "fixed": the query's own block, plus the last c
            # "summary" positions of every block, which carry information across blocks.
            allowed = (q // block == k // block) | (k % block >= block - config.sparse_summary)
        else:
            # "strided": the previous l positions, plus every l-th position before them.
            allowed = (d.abs() < block) | (d % block == 0)
    else:
        allowed = None
    if causal:
        order = d >= 0
        if prefix is not None:
            order = order | (k < prefix)
        allowed = order if allowed is None else allowed & order
    return allowed


def pattern_mask(
    config: ModelConfig,
    q_pos: torch.Tensor,
    k_len: int,
    *,
    causal: bool,
    key_padding: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The attention mask for queries at positions q_pos (B or 1, T) over keys 0..k_len-1:
    boolean (B or 1, 1, T, S), True = attend, or additive float (B or 1, H, T, S) when a
    position `bias` (ALiBi, T5) is given. None when every query may see every key."""
    q = q_pos[:, :, None]
    k = torch.arange(k_len, device=q_pos.device)[None, None, :]
    prefix = None if prefix_len is None else prefix_len.to(q.device)[:, None, None]
    allowed = attention_pattern(config, q, k, causal=causal, prefix=prefix)
    if key_padding is not None:
        keep = key_padding[:, None, :].bool()
        allowed = keep if allowed is None else allowed & keep
        # A padded query would attend to nothing (NaN in softmax); let it see itself instead.
        allowed = allowed | (k == q)
    if allowed is not None:
        allowed = allowed[:, None]
    if bias is None:
        return allowed
    if allowed is None:
        return bias
    return bias.masked_fill(~allowed, float("-inf"))


_FLEX = {"compiled": None, "failed": False}
# Block masks by pattern (the fields attention_pattern reads), length, causality and device.
_PATTERN_FIELDS = ("attention", "window", "sparse_block", "sparse_pattern", "sparse_summary")
_BLOCK_MASKS: dict[tuple, object] = {}


class FlexMask:
    """A flex_attention block mask (Dong et al. 2024) for a sparse pattern: blocks with no
    allowed pair are skipped, so sliding and block-sparse attention cost grows with the
    allowed pairs, not T^2. `dense` is the SDPA fallback where flex_attention cannot run."""

    def __init__(self, config: ModelConfig, T: int, causal: bool, prefix_len, device) -> None:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            prefix = None if prefix_len is None else prefix_len[b]
            return attention_pattern(config, q, k, causal=causal, prefix=prefix)

        if prefix_len is None:
            # Same pattern, length and device: the same mask (every layer and step reuses it).
            key = (*(getattr(config, f) for f in _PATTERN_FIELDS), T, causal, str(device))
            if key not in _BLOCK_MASKS:
                if len(_BLOCK_MASKS) >= 32:
                    _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
                _BLOCK_MASKS[key] = _block_mask(mask_mod, T, device)
            self.block_mask = _BLOCK_MASKS[key]
        else:  # per-row prefixes: flex's own builder (it evaluates every pair once)
            batch = prefix_len.shape[0]
            self.block_mask = create_block_mask(mask_mod, batch, None, T, T, device=device)
        self.config, self.T, self.causal, self.prefix_len = config, T, causal, prefix_len

    def dense(self, device) -> torch.Tensor:
        q_pos = torch.arange(self.T, device=device)[None]
        return pattern_mask(
            self.config, q_pos, self.T, causal=self.causal, prefix_len=self.prefix_len
        )

    def attend(self, q, k, v, scale: float | None, gqa: bool) -> torch.Tensor:
        # torch 2.13's flex_attention has no backward on CPU: CPU training takes the SDPA path.
        if not _FLEX["failed"] and not (q.requires_grad and q.device.type == "cpu"):
            try:
                if _FLEX["compiled"] is None:
                    from torch.nn.attention.flex_attention import flex_attention

                    _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
                return _FLEX["compiled"](
                    q, k, v, block_mask=self.block_mask, scale=scale, enable_gqa=gqa
                )
            except Exception as e:  # no compiler / unsupported device: use the dense path
                _FLEX["failed"] = True
                warnings.warn(f"flex_attention unavailable ({e!r:.200}); using SDPA", stacklevel=2)
        mask = self.dense(q.device)
        if gqa:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _block_mask(mask_mod, T: int, device, block: int = 128):
    """flex_attention's BlockMask for a pattern shared by every row and head, built one row of
    query tiles at a time: memory O(block * T) where create_block_mask (uncompiled) first
    evaluates all T^2 pairs at once. Tiles with no allowed pair are skipped by the kernel,
    tiles where every pair is allowed skip the mask, the rest apply `mask_mod`."""
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-T // block)
    keys = torch.arange(n * block, device=device)
    partial = torch.zeros(n, n, dtype=torch.bool, device=device)
    full = torch.zeros(n, n, dtype=torch.bool, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    for i in range(n):
        q = torch.arange(i * block, (i + 1) * block, device=device)[:, None]
        allowed = mask_mod(zero, zero, q, keys[None, :]) & (keys < T) & (q < T)
        tiles = allowed.view(block, n, block)
        some, every = tiles.any(dim=(0, 2)), tiles.all(dim=2).all(dim=0)
        full[i], partial[i] = every, some & ~every

    def indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The kernel reads the first count[i] entries of row i's index list.
        order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True)
        return tiles.sum(-1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(
        *indices(partial), *indices(full), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(T, T)
    )


def softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    causal: bool,
    scale: float,
    cap: float,
    dropout: float,
) -> torch.Tensor:
    """softmax(cap * tanh(q k^T * scale / cap) + mask) v, written out: SDPA has no soft-capping
    (Gemma 2, Team et al. 2024: caps attention logits at 50 to keep them from running away)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = cap * torch.tanh(scores / cap)
    if mask is None and causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        )
    probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, dropout)
    return probs @ v


class Attention(nn.Module):
    """Self-attention with fused QKV projection and n_kv_heads <= n_heads (GQA/MQA); causal
    unless `causal=False` (encoder). `mask` is None (plain causal or full attention), a boolean
    or additive float tensor (pattern_mask) or a FlexMask."""

    def __init__(self, config: ModelConfig, layer: int, causal: bool = True) -> None:
        super().__init__()
        self.layer, self.causal = layer, causal
        self.n_heads, self.kv_heads, self.head_dim = (
            config.n_heads,
            config.kv_heads,
            config.dim_head,
        )
        qkv_out = (self.n_heads + 2 * self.kv_heads) * self.head_dim
        self.qkv = Linear(config.d_model, qkv_out, bias=config.has_qkv_bias)
        self.out = Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.scale, self.softcap = config.attn_scale, config.attn_softcap
        # Partial rotary (GPT-NeoX): RoPE turns the first rope_dim dimensions of each head.
        self.rope_dim = config.rope_dim if config.rope_dim < self.head_dim else 0
        # QK-norm (Dehghani et al. 2023): per-head norms of q and k bound the attention logits.
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | FlexMask | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV = self.n_heads, self.kv_heads
        # One (B, heads, T, D) view of the fused projection; q and k heads are adjacent, so a
        # single rotary call turns both (half the small ops of a decode step's attention).
        qkv = self.qkv(x).view(B, T, H + 2 * KV, self.head_dim).transpose(1, 2)
        qk, v = qkv[:, : H + KV], qkv[:, H + KV :]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])), dim=1)
        if rope is not None:
            if self.rope_dim:
                r = self.rope_dim
                qk = torch.cat((apply_rotary(qk[..., :r], *rope), qk[..., r:]), dim=-1)
            else:
                qk = apply_rotary(qk, *rope)
        q, k = qk[:, :H], qk[:, H:]
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)
        if isinstance(mask, FlexMask):
            y = mask.attend(q, k, v, self.scale, self.kv_heads != self.n_heads)
        elif self.softcap is not None:
            y = softcapped_attention(
                q,
                k,
                v,
                mask,
                causal=self.causal and past == 0,
                scale=self.scale or self.head_dim**-0.5,
                cap=self.softcap,
                dropout=self.dropout if self.training else 0.0,
            )
        else:
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
                is_causal=self.causal and mask is None and T > 1 and past == 0,
                scale=self.scale,
                **gqa,
            )
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def _cross_sdpa(q, k, v, mask, scale: float | None, dropout: float) -> torch.Tensor:
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention (Vaswani et al. 2017; T5): queries from the decoder, keys and
    values from the encoder output `memory`, computed once per sequence and kept in the
    cache's memory_kv while decoding. `mask`: (B, 1, 1, S) boolean encoder padding, or None."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.kv_heads, self.head_dim = (
            config.n_heads,
            config.kv_heads,
            config.dim_head,
        )
        bias = config.has_qkv_bias
        self.q = Linear(config.d_model, self.n_heads * self.head_dim, bias=bias)
        self.kv = Linear(config.d_model, 2 * self.kv_heads * self.head_dim, bias=bias)
        self.out = Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.scale, self.softcap = config.attn_scale, config.attn_softcap
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else None

    def memory_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = memory.shape
        kv = self.kv(memory).view(B, S, 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        k, v = kv[:, : self.kv_heads], kv[:, self.kv_heads :]
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if cache is not None and self.layer in cache.memory_kv:
            k, v = cache.memory_kv[self.layer]
        else:
            k, v = self.memory_keys_values(memory)
            if cache is not None:
                cache.memory_kv[self.layer] = (k, v)
        if self.softcap is not None:
            y = softcapped_attention(
                q,
                k,
                v,
                mask,
                causal=False,
                scale=self.scale or self.head_dim**-0.5,
                cap=self.softcap,
                dropout=self.dropout if self.training else 0.0,
            )
        else:
            y = _cross_sdpa(q, k, v, mask, self.scale, self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
