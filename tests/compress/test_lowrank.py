"""Low-rank factorisation: Eckart-Young (the error is the tail of the singular values), energy
targets, and replacement inside a model."""

import numpy as np
import pytest
import torch
from torch import nn

from lmforge.compress.lowrank import LowRankLinear, factorize, low_rank_model, rank_for_energy
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer


def linear(out_features=24, in_features=40, seed=0, bias=True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).double()


@pytest.mark.parametrize("rank", [1, 5, 12, 24])
def test_error_is_the_tail_of_the_singular_values(rank):
    layer = linear()
    w = layer.weight.detach().numpy()
    sigma = np.linalg.svd(w, compute_uv=False)  # numpy's LAPACK, independent of torch's
    product = factorize(layer, rank=rank).weight_product.detach().numpy()
    diff = w - product
    # Eckart-Young: ||W - W_k||_F^2 = sum_{i>k} sigma_i^2 and ||W - W_k||_2 = sigma_{k+1}.
    assert np.sum(diff**2) == pytest.approx(np.sum(sigma[rank:] ** 2), rel=1e-9, abs=1e-20)
    spectral = np.linalg.norm(diff, 2)
    assert spectral == pytest.approx(sigma[rank] if rank < len(sigma) else 0, abs=1e-12)
    assert np.linalg.matrix_rank(product, tol=1e-9) == rank


def test_no_other_rank_k_matrix_is_closer():
    # Against candidates built without the SVD: random rank-k products and the best rank-k
    # fit found by alternating least squares from a random start.
    layer = linear(16, 20)
    w = layer.weight.detach()
    k = 4
    best = (w - factorize(layer, rank=k).weight_product).norm().item()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, k, generator=g, dtype=torch.float64)
    for _ in range(50):
        b = torch.linalg.lstsq(a, w).solution  # (k, 20)
        a = torch.linalg.lstsq(b.T, w.T).solution.T
    assert best <= (w - a @ b).norm().item() + 1e-9
    for _ in range(20):
        left = torch.randn(16, k, generator=g, dtype=torch.float64)
        right = torch.randn(k, 20, generator=g, dtype=torch.float64)
        assert best < (w - left @ right).norm().item()


def test_outputs_and_bias():
    layer = linear()
    low = factorize(layer, rank=24)  # full rank: the same map
    x = torch.randn(3, 40, dtype=torch.float64)
    torch.testing.assert_close(low(x), layer(x))
    assert isinstance(low, LowRankLinear) and low.down.bias is None
    assert low.down.weight.shape == (24, 40) and low.up.weight.shape == (24, 24)


def test_energy_target_picks_the_smallest_sufficient_rank():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert rank_for_energy(s, 16 / 22) == 1
    assert rank_for_energy(s, 16 / 22 + 1e-6) == 2
    assert rank_for_energy(s, 0.9) == 2  # 20/22 = 0.909
    assert rank_for_energy(s, 0.95) == 3
    assert rank_for_energy(s, 1.0) == 4
    layer = linear()
    sigma = torch.linalg.svdvals(layer.weight.detach())
    low = factorize(layer, energy=0.8)
    kept = (sigma[: low.rank] ** 2).sum() / (sigma**2).sum()
    dropped_one = (sigma[: low.rank - 1] ** 2).sum() / (sigma**2).sum()
    assert kept >= 0.8 > dropped_one


def test_bad_targets():
    layer = linear()
    with pytest.raises(ConfigError, match="exactly one of rank or energy"):
        factorize(layer)
    with pytest.raises(ConfigError, match="exactly one of rank or energy"):
        factorize(layer, rank=2, energy=0.5)
    with pytest.raises(ConfigError, match="rank 25 is not between 1 and min"):
        factorize(layer, rank=25)
    with pytest.raises(ConfigError, match="rank 0 is not between"):
        factorize(layer, rank=0)
    with pytest.raises(ConfigError, match="energy must be in"):
        factorize(layer, energy=1.5)


def test_low_rank_model_replaces_layers_that_get_smaller():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)
    model = Transformer(config).eval()
    ids = torch.randint(0, 64, (1, 8))
    report = low_rank_model(model, rank=8)
    # qkv 96x32 -> 8*(32+96) = 1024 < 3072; out 32x32 -> 512 < 1024; w_in 128x32, w_out 32x64.
    assert {r.name.split(".", 2)[2] for r in report} == {
        "attn.qkv",
        "attn.out",
        "mlp.w_in",
        "mlp.w_out",
    }
    assert all(r.rank == 8 and r.params_after < r.params_before for r in report)
    assert isinstance(model.blocks[0].attn.qkv, LowRankLinear)
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()
    # Full rank where it saves nothing: layers are left alone.
    fresh = Transformer(config)
    assert low_rank_model(fresh, rank=32) == []
    with pytest.raises(ConfigError, match="no Linear layer"):
        low_rank_model(fresh, rank=4, targets=("nothing",))
