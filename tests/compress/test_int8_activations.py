"""LLM.int8() and W8A8 (naive, SmoothQuant) against their formulas written out."""

import copy

import torch

from lmforge.compress.llm_int8 import LLMInt8Linear
from lmforge.compress.quantized_model import quantize_model
from lmforge.compress.smoothquant import W8A8Linear, smoothing_factors
from lmforge.model import ModelConfig, Transformer
from lmforge.model.layers import Linear


def outlier_inputs(n=16, d=128, channels=(3, 77), magnitude=40.0):
    """Activations with a few systematic outlier channels, as in LLMs past ~6.7B parameters."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    x[:, list(channels)] *= magnitude
    return x


def layer(d_in=128, d_out=64):
    torch.manual_seed(0)
    return Linear(d_in, d_out, bias=True)


def test_llm_int8_matches_decomposition_formula():
    lin, x = layer(), outlier_inputs()
    q = LLMInt8Linear.from_linear(lin)
    w = lin.weight.detach()
    sw = w.abs().amax(1) / 127
    wq = torch.round(w / sw[:, None])
    outliers = (x.abs() > 6.0).any(0)
    assert outliers.nonzero().flatten().tolist() == [3, 77]
    rest = x.clone()
    rest[:, outliers] = 0
    sx = rest.abs().amax(1) / 127
    xq = torch.round(rest / sx[:, None])
    expected = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        for k in range(w.shape[0]):
            fp = sum(x[i, j].double() * wq[k, j] * sw[k] for j in outliers.nonzero().flatten())
            integer = (xq[i].double() * wq[k].double()).sum() * sx[i] * sw[k]
            expected[i, k] = fp + integer + lin.bias[k]
    with torch.no_grad():
        assert torch.allclose(q(x).double(), expected, atol=1e-4)


def test_outlier_decomposition_beats_plain_int8():
    lin, x = layer(), outlier_inputs()
    exact = lin(x).detach()
    decomposed = LLMInt8Linear.from_linear(lin)
    plain = LLMInt8Linear.from_linear(lin, threshold=float("inf"))  # every dimension in int8
    with torch.no_grad():
        err_decomposed = (decomposed(x) - exact).abs().mean()
        err_plain = (plain(x) - exact).abs().mean()
    assert err_decomposed < 0.3 * err_plain


def test_smoothing_factors_formula():
    act = torch.tensor([4.0, 1.0, 100.0])
    w = torch.tensor([[0.5, -2.0, 0.1], [-1.0, 0.5, 0.2]])
    s = smoothing_factors(act, w, 0.5)
    expected = torch.tensor([4**0.5 / 1.0**0.5, 1 / 2**0.5, 100**0.5 / 0.2**0.5])
    assert torch.allclose(s, expected)
    assert torch.allclose(smoothing_factors(act, w, 1.0), act)


def test_w8a8_matches_formula():
    lin, x = layer(), outlier_inputs()
    s = smoothing_factors(x.abs().amax(0), lin.weight)
    q = W8A8Linear.from_linear(lin, s)
    xs, ws = x / s, lin.weight.detach() * s
    ax, aw = xs.abs().amax(1) / 127, ws.abs().amax(1) / 127  # per token, per output channel
    xq, wq = torch.round(xs / ax[:, None]), torch.round(ws / aw[:, None])
    expected = (xq.double() @ wq.double().t()) * ax[:, None] * aw[None, :] + lin.bias
    with torch.no_grad():
        assert torch.allclose(q(x).double(), expected, atol=1e-4)


def test_smoothquant_beats_naive_w8a8_on_outlier_channels():
    lin, x = layer(), outlier_inputs()
    exact = lin(x).detach()
    naive = W8A8Linear.from_linear(lin)
    smooth = W8A8Linear.from_linear(lin, smoothing_factors(x.abs().amax(0), lin.weight))
    with torch.no_grad():
        assert (smooth(x) - exact).abs().mean() < 0.5 * (naive(x) - exact).abs().mean()


def test_smoothquant_model_calibrates_every_layer():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    fp = Transformer(config).eval()
    calibration = torch.randint(0, 128, (4, 32))
    model = quantize_model(copy.deepcopy(fp), "smoothquant", 8, calibration=calibration)
    layers = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert len(layers) == 2 * 4 + 1
    assert all(not torch.allclose(m.smooth, torch.ones_like(m.smooth)) for m in layers)
    # Calibration saw the real inputs: the first block's qkv input is the normed embedding.
    x = fp.blocks[0].attn_norm(fp.embed(calibration))
    expected = smoothing_factors(x.abs().amax((0, 1)), fp.blocks[0].attn.qkv.weight)
    assert torch.allclose(model.blocks[0].attn.qkv.smooth, expected, rtol=1e-5)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert (model(ids) - fp(ids)).abs().max() < 0.05 * fp(ids).abs().max()
