"""Sliding-window and block-sparse attention against brute-force dense masked attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer
from lmforge.model.attention import FlexMask, attention_pattern, pattern_mask


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def brute_force_allowed(kind: str, T: int, causal: bool, **p) -> torch.Tensor:
    """(T, T) allowed[i, j] written out pair by pair from the papers' definitions."""
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            if causal and j > i:
                continue
            if kind == "full":
                ok = True
            elif kind == "sliding":  # Longformer / Mistral: the last `window` keys
                ok = abs(i - j) < p["window"]
            elif kind == "fixed":  # Child et al. 2019: own block + last c of each block
                b, c = p["block"], p["summary"]
                ok = i // b == j // b or j % b >= b - c
            else:  # strided: the previous l positions and every l-th one before them
                b = p["block"]
                ok = abs(i - j) < b or (i - j) % b == 0
            allowed[i, j] = ok
    return allowed


def dense_attention(q, k, v, allowed):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return F.softmax(scores, -1) @ v


PATTERNS = {
    "sliding": (dict(attention="sliding", window=5), dict(window=5)),
    "fixed": (
        dict(attention="block_sparse", sparse_block=4, sparse_summary=2),
        dict(block=4, summary=2),
    ),
    "strided": (
        dict(attention="block_sparse", sparse_block=4, sparse_pattern="strided"),
        dict(block=4),
    ),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("kind", PATTERNS)
def test_pattern_mask_matches_brute_force(kind, causal):
    cfg_kw, p = PATTERNS[kind]
    config = tiny(**cfg_kw)
    T = 19
    mask = pattern_mask(config, torch.arange(T)[None], T, causal=causal)
    assert torch.equal(mask[0, 0], brute_force_allowed(kind, T, causal, **p))


@pytest.mark.parametrize("kind", PATTERNS)
def test_sparse_model_attention_matches_dense_reference(kind):
    """The whole layer through the model's mask vs softmax(QK^T/sqrt(d) + mask) V written out."""
    cfg_kw, p = PATTERNS[kind]
    torch.manual_seed(0)
    model = Transformer(tiny(**cfg_kw, position="learned", n_layers=1)).eval()
    attn = model.blocks[0].attn
    T = 17
    x = torch.randn(2, T, 64)
    q, k, v = (t.view(2, T, 4, 16).transpose(1, 2) for t in attn.qkv(x).split(64, dim=-1))
    ref = dense_attention(q, k, v, brute_force_allowed(kind, T, True, **p))
    ref = attn.out(ref.transpose(1, 2).reshape(2, T, 64))
    mask = model._mask(T, 0, None, None, None, False)
    torch.testing.assert_close(attn(x, None, mask), ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_limits_what_a_token_sees():
    torch.manual_seed(0)
    model = Transformer(tiny(attention="sliding", window=4)).eval()
    x = torch.randint(0, 97, (1, 30))
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % 97
    # Two layers of window 4 reach back 6 positions; position 20 cannot see token 0.
    torch.testing.assert_close(model(x)[:, 10:], model(y)[:, 10:])
    assert not torch.allclose(model(x)[:, :4], model(y)[:, :4])


@pytest.mark.parametrize("kind", ["sliding", "fixed"])
def test_sparse_kv_cache_matches_full_recompute(kind):
    torch.manual_seed(0)
    model = Transformer(tiny(**PATTERNS[kind][0])).eval()
    x = torch.randint(0, 97, (2, 24))
    full = model(x)
    cache = model.new_cache(2)
    steps = [model(x[:, :9], cache=cache)] + [
        model(x[:, i : i + 1], cache=cache) for i in range(9, 24)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_flex_attention_block_mask_matches_sdpa():
    """flex_attention with a block mask (compiled; the SDPA fallback where it cannot run)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    config = tiny(attention="block_sparse", sparse_block=4, sparse_summary=1)
    q, k, v = (torch.randn(1, 4, 32, 16) for _ in range(3))
    flex = FlexMask(config, 32, True, None, "cpu")
    dense = pattern_mask(config, torch.arange(32)[None], 32, causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(flex.attend(q, k, v, None, False), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_tile_by_tile_block_mask_equals_flex_builder_and_attends_like_sdpa(causal):
    """FlexMask builds its BlockMask one row of query tiles at a time (memory O(128 T)); its
    empty / partial / full tiles equal create_block_mask's, and flex_attention over it equals
    dense SDPA over the same pattern, across empty, partial and full 128 x 128 tiles."""
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    config = tiny(attention="sliding", window=200, max_seq_len=512)
    T = 384

    def mask_mod(b, h, q, k):
        return attention_pattern(config, q, k, causal=causal)

    ours = FlexMask(config, T, causal, None, "cpu").block_mask
    ref = flex_attention.create_block_mask(mask_mod, None, None, T, T, device="cpu")
    for a, b in (
        (ours.kv_num_blocks, ref.kv_num_blocks),
        (ours.full_kv_num_blocks, ref.full_kv_num_blocks),
    ):
        assert torch.equal(a.flatten(), b.flatten())
    assert ours.kv_num_blocks.sum() > 0  # partial tiles; bidirectional also has full ones
    assert (ours.full_kv_num_blocks.sum() > 0) == (not causal)
    q, k, v = (torch.randn(1, 2, T, 16) for _ in range(3))
    dense = pattern_mask(config, torch.arange(T)[None], T, causal=causal)
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    got = FlexMask(config, T, causal, None, "cpu").attend(q, k, v, None, False)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
