"""NF4 with double quantization against the QLoRA formulas."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from lmforge.compress.nf4 import NF4_LEVELS, NF4Linear, block_scales, dequantize_nf4, quantize_nf4
from lmforge.compress.quantize import unpack_int4
from lmforge.errors import ConfigError
from lmforge.model.layers import Linear


def test_levels_are_normal_quantiles():
    # QLoRA: quantiles of N(0, 1) for 8 positive and 7 negative levels plus an exact 0, the
    # outermost quantile at the mean of 1 - 1/(2*16) and 1 - 1/(2*15), normalised to [-1, 1].
    offset = 1 - (1 / 32 + 1 / 30) / 2
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([positive, [0.0], negative]))
    levels /= levels.max()
    assert np.allclose(levels, NF4_LEVELS, atol=1e-6)


def test_blockwise_nf4_matches_formula():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    q = quantize_nf4(w)
    blocks = w.view(-1, 64)
    absmax = blocks.abs().amax(-1)
    # Double quantization: (absmax - mean) in int8 with one absmax scale per 256 blocks.
    centred = absmax - absmax.mean()
    s2 = centred.abs().max() / 127
    c2 = torch.round(centred / s2) * s2 + absmax.mean()
    assert torch.allclose(block_scales(q), c2, atol=1e-6)
    assert (block_scales(q) - absmax).abs().max() <= s2 / 2 + 1e-6
    levels = torch.tensor(NF4_LEVELS)
    nearest = (blocks[..., None] / absmax[:, None, None] - levels).abs().argmin(-1)
    assert torch.equal(unpack_int4(q["codes"]).long().view(-1, 64), nearest)
    assert torch.allclose(dequantize_nf4(q, w.shape), (levels[nearest] * c2[:, None]).view(8, 128))


def test_scale_blocks_of_256_and_memory():
    w = torch.randn(300 * 64)  # 300 blocks: two second-level blocks, the last one partial
    q = quantize_nf4(w)
    assert q["scale2"].shape == (2,) and q["scale_codes"].shape == (300,)
    bits = sum(t.numel() * t.element_size() * 8 for t in q.values()) / w.numel()
    assert bits == pytest.approx(4 + 8 / 64 + 32 * 3 / w.numel())


def test_nf4_linear_error_below_uniform_int4_on_normal_weights():
    torch.manual_seed(0)
    linear = Linear(256, 128, bias=False)
    torch.nn.init.normal_(linear.weight)
    layer = NF4Linear.from_linear(linear)
    x = torch.randn(4, 256)
    assert torch.allclose(layer(x), x @ layer.dequantized_weight().t(), atol=1e-5)
    # Uniform absmax 4-bit levels over the same blocks of 64, for comparison.
    blocks = linear.weight.detach().view(-1, 64)
    s = blocks.abs().amax(-1, keepdim=True) / 7
    uniform = (torch.round(blocks / s).clamp(-7, 7) * s).view(128, 256)
    w = linear.weight.detach()
    assert (layer.dequantized_weight() - w).pow(2).mean() < (uniform - w).pow(2).mean()


def test_bad_shape():
    with pytest.raises(ConfigError, match="NF4"):
        NF4Linear(100, 8)
