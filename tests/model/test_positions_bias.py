"""Position encodings against their published formulas: sinusoidal, ALiBi slopes, T5 buckets,
partial RoPE."""

import math

import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.model.positions import alibi_bias, alibi_slopes, sinusoidal_table, t5_bucket


def test_sinusoidal_table_matches_vaswani_formula():
    d = 10
    table = sinusoidal_table(torch.arange(50), d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def reference_slopes(n: int) -> list[float]:
    """Press et al. 2022: for 2^k heads the geometric sequence starting at 2^(-8/n) with that
    ratio; otherwise the nearest lower power of two's slopes, then every other slope of 2x."""

    def geometric(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return geometric(n)
    lower = 2 ** math.floor(math.log2(n))
    return geometric(lower) + geometric(2 * lower)[0::2][: n - lower]


@pytest.mark.parametrize("n", [1, 4, 6, 8, 12, 16, 20])
def test_alibi_slopes_match_formula(n):
    assert alibi_slopes(n).tolist() == pytest.approx(reference_slopes(n), rel=1e-6)


def test_alibi_slopes_of_8_heads_are_the_papers():
    assert alibi_slopes(8).tolist() == pytest.approx([2.0**-k for k in range(1, 9)])


def test_alibi_bias_is_minus_slope_times_distance():
    bias = alibi_bias(6, torch.arange(5)[None], torch.arange(5), causal=True)
    slopes = reference_slopes(6)
    for h in range(6):
        for i in range(5):
            for j in range(i + 1):
                assert bias[0, h, i, j].item() == pytest.approx(-slopes[h] * (i - j))
    sym = alibi_bias(6, torch.arange(5)[None], torch.arange(5), causal=False)
    assert sym[0, 2, 1, 4].item() == pytest.approx(-slopes[2] * 3)


def reference_bucket(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucketing (Raffel et al. 2020) for one key-minus-query offset, written out."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if rel > 0:
            bucket += num_buckets
        n = abs(rel)
    else:
        n = max(-rel, 0)
    exact = num_buckets // 2
    if n < exact:
        return bucket + n
    large = exact + int(
        math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    )
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_t5_buckets_match_reference(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-300, 300)
    got = t5_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    want = [reference_bucket(r, bidirectional, num_buckets, max_distance) for r in rel.tolist()]
    assert got.tolist() == want


def test_partial_rope_leaves_the_other_dimensions_alone():
    """rope_fraction 0.5: the last half of each head's q/k dims carry no position."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, rope_fraction=0.5)
    )
    assert model.rope.cos.shape[-1] == 8  # rotary tables for 8 of 16 dims
    attn = model.blocks[0].attn
    x = torch.randn(1, 6, 32)
    qkv = attn.qkv(x).view(1, 6, 6, 16).transpose(1, 2)
    seen = {}

    def spy(q, k, v, **kw):
        seen["q"] = q
        return torch.zeros_like(q)

    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = spy
    try:
        attn(x, model.rope(torch.arange(6)[None]), None)
    finally:
        F.scaled_dot_product_attention = original
    torch.testing.assert_close(seen["q"][..., 8:], qkv[:, :2, :, 8:])
    assert not torch.allclose(seen["q"][:, :, 1:, :8], qkv[:, :2, 1:, :8])


@pytest.mark.parametrize("position", ["sinusoidal", "alibi", "t5_bias", "none", "learned"])
def test_every_position_kind_trains_and_caches(position):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, d_model=48, n_layers=2, n_heads=6, position=position)
    model = Transformer(config)
    x = torch.randint(0, 50, (2, 12))
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        steps = [model(x[:, :5], cache=cache)] + [
            model(x[:, i : i + 1], cache=cache) for i in range(5, 12)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
