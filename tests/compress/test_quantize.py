"""Quantization primitives against x_q = R(x/S) - Z written out by hand."""

import pytest
import torch

from lmforge.compress.quantize import (
    dequantize,
    int8_matmul,
    pack_int4,
    qrange,
    quantize,
    unpack_int4,
)
from lmforge.errors import ConfigError


def test_ranges():
    assert qrange(8, True) == (-127, 127) and qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-7, 7) and qrange(4, False) == (0, 15)


def test_symmetric_per_tensor_matches_formula():
    x = torch.tensor([[-2.0, 0.5, 1.0], [0.25, -0.1, 1.5]])
    t = quantize(x, 8, symmetric=True, granularity="tensor")
    S = 2.0 / 127
    expected = torch.round(x / S).clamp(-127, 127)
    assert torch.equal(t.q.float(), expected)
    assert torch.allclose(dequantize(t), expected * S)
    assert t.q[0, 0] == -127  # absmax maps to the end of the range


def test_asymmetric_per_channel_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(5, 16) + torch.arange(5.0)[:, None]  # rows with different offsets
    t = quantize(x, 4, symmetric=False, granularity="channel")
    for r in range(5):
        lo, hi = min(x[r].min().item(), 0.0), max(x[r].max().item(), 0.0)
        S = (hi - lo) / 15
        Z = round(lo / S)  # x_q(lo) = R(lo/S) - Z = 0
        q = (torch.round(x[r] / S) - Z).clamp(0, 15)
        assert torch.equal(t.q[r].float(), q)
        assert torch.allclose(dequantize(t)[r], S * (q + Z), atol=1e-6)
        # Round-to-nearest error is at most half a step (inside the range).
        assert (dequantize(t)[r] - x[r]).abs().max() <= S / 2 + 1e-5


def test_zero_is_exact_for_asymmetric():
    x = torch.tensor([[0.0, 0.3, 0.7, 2.9, -0.4]])
    t = quantize(x, 8, symmetric=False, granularity="token")
    assert dequantize(t)[0, 0] == 0.0


def test_per_token_and_per_group_units():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    t = quantize(x, 8, granularity="token")
    assert t.scale.shape == (2, 3, 1)
    assert torch.allclose(t.scale[..., 0], x.abs().amax(-1) / 127)
    g = quantize(x, 8, granularity="group", group_size=4)
    assert g.scale.shape == (2, 3, 2, 1)
    assert torch.allclose(g.scale[..., 1, 0], x[..., 4:].abs().amax(-1) / 127)
    # Finer groups never do worse than one scale per token.
    assert (dequantize(g) - x).abs().mean() <= (dequantize(t) - x).abs().mean()


def test_group_size_must_divide():
    with pytest.raises(ConfigError, match="group_size 128 does not divide the 576 inputs of a row"):
        quantize(torch.zeros(4, 576), 4, granularity="group", group_size=128)


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_bad_bits(bits):
    with pytest.raises(ConfigError, match="bits"):
        quantize(torch.zeros(4, 8), bits)


def test_stochastic_rounding_is_unbiased_and_floor_or_ceil():
    x = torch.full((1, 20000), 0.3) * torch.tensor([1.0] * 19999 + [127 / 0.3])[None]
    g = torch.Generator().manual_seed(0)
    t = quantize(x, 8, granularity="tensor", rounding="stochastic", generator=g)
    y = x[0, :-1] / t.scale.item()  # 0.3 / (127/127) = 0.3 steps
    codes = t.q[0, :-1].float()
    assert set(codes.unique().tolist()) <= {torch.floor(y[0]).item(), torch.ceil(y[0]).item()}
    assert abs(codes.mean().item() - y[0].item()) < 0.02  # E[R(y)] = y; nearest would give 0
    assert torch.equal(
        quantize(x, 8, granularity="tensor").q[0, :-1], torch.zeros(19999, dtype=torch.int8)
    )


def test_int4_packing_roundtrip_and_layout():
    codes = torch.tensor([[1, 2, 15, 0], [7, 8, 3, 12]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (2, 2) and packed.dtype == torch.uint8
    assert packed[0, 0] == 1 + 2 * 16 and packed[0, 1] == 15  # low nibble first
    assert torch.equal(unpack_int4(packed), codes)
    with pytest.raises(ConfigError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def test_int8_matmul_is_exact():
    torch.manual_seed(0)
    a = torch.randint(-127, 128, (3, 700), dtype=torch.int8)
    b = torch.randint(-127, 128, (5, 700), dtype=torch.int8)
    assert torch.equal(int8_matmul(a, b), (a.long() @ b.long().t()).int())
