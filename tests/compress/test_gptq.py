"""GPTQ: the Hessian, reconstruction error below RTN's on the same layer, calibration errors."""

import pytest
import torch

from lmforge.compress.calibration import calibration_tokens
from lmforge.compress.gptq import HessianAccumulator, gptq_quantize
from lmforge.compress.quantize import dequantize, quantize
from lmforge.errors import ConfigError, CorpusError


def correlated_layer(n_out=96, n_in=256, n=1024):
    """A weight and inputs whose dimensions are strongly correlated (a random mixing matrix),
    the case where compensating one column's error with the others pays."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + 0.2 * torch.eye(n_in)
    X = torch.randn(n, n_in, generator=g) @ mix
    W = torch.randn(n_out, n_in, generator=g)
    return W, X


def dequant(codes, scale, zero, group_size):
    n_out, n_in = codes.shape
    grouped = codes.float().view(n_out, n_in // group_size, group_size)
    return ((grouped + zero[..., None]) * scale[..., None]).view(n_out, n_in)


def test_hessian_accumulates_2xxt_over_batches():
    _, X = correlated_layer()
    h = HessianAccumulator(X.shape[1])
    for chunk in X.split(300):
        h.add(chunk)
    assert torch.allclose(h.H, 2 * X.double().t() @ X.double() / X.shape[0])


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "bits,group_size,symmetric", [(4, 64, False), (3, 128, False), (8, 256, True)]
)
def test_gptq_reconstruction_beats_rtn(bits, group_size, symmetric, act_order):
    W, X = correlated_layer()
    h = HessianAccumulator(W.shape[1])
    h.add(X)
    codes, scale, zero = gptq_quantize(
        W, h.H, bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order
    )
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert codes.min() >= lo and codes.max() <= hi
    Q = dequant(codes, scale, zero, group_size)
    rtn = dequantize(
        quantize(W, bits, symmetric=symmetric, granularity="group", group_size=group_size)
    )

    def error(M):
        return torch.linalg.norm((W - M) @ X.t()).item()

    assert error(Q) < 0.85 * error(rtn)  # measured ~0.7 of RTN's error


def test_gptq_on_uncorrelated_identity_hessian_equals_rtn():
    # With H = I no column can compensate another: GPTQ reduces to round-to-nearest.
    W, _ = correlated_layer()
    codes, scale, zero = gptq_quantize(W, torch.eye(W.shape[1]), bits=4, group_size=64)
    rtn = quantize(W, 4, symmetric=False, granularity="group", group_size=64)
    assert torch.equal(codes.to(torch.int8), rtn.q)


def test_gptq_group_size_must_divide():
    with pytest.raises(ConfigError, match="does not divide"):
        gptq_quantize(torch.zeros(4, 100), torch.eye(100), bits=4, group_size=64)


class CharTokenizer:
    eos_id = 0

    def encode(self, text):
        return [ord(c) % 97 + 1 for c in text]


def test_calibration_tokens_and_errors():
    ids = calibration_tokens(CharTokenizer(), 2, 5, ["abcdef", "ghij"])
    assert ids.tolist() == [[1, 2, 3, 4, 5], [6, 0, 7, 8, 9]]  # eos (0) between documents
    with pytest.raises(CorpusError, match="empty"):
        calibration_tokens(CharTokenizer(), 2, 5, ["", "  "])
    with pytest.raises(CorpusError, match="too short: 4 tokens, need"):
        calibration_tokens(CharTokenizer(), 2, 5, ["abc"])
