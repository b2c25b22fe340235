"""Low-rank factorisation of linear layers by truncated SVD (seed 001, 模型压缩技术).

W (out x in) = U S V^T; keeping the k largest singular values gives W_k = (U_k S_k^1/2)(S_k^1/2 V_k^T),
the best rank-k approximation in both the Frobenius and the spectral norm (Eckart & Young 1936):
||W - W_k||_F^2 = sum of the dropped sigma_i^2 and ||W - W_k||_2 = sigma_{k+1}. One Linear of
out*in weights becomes two of k*(in + out), a saving when k < out*in / (out + in). The rank comes
either directly or from an energy target: the smallest k keeping that fraction of sum sigma_i^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.layers import Linear

DEFAULT_TARGETS = ("attn.qkv", "attn.out", "mlp.w_in", "mlp.w_out")


class LowRankLinear(nn.Module):
    """x -> up(down(x)): a rank-k stand-in for a Linear; `down` (k x in) has no bias, `up`
    (out x k) carries the original bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = Linear(in_features, rank, bias=False)
        self.up = Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight_product(self) -> torch.Tensor:
        """The (out x in) matrix this layer applies: up.weight @ down.weight."""
        return self.up.weight @ self.down.weight


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest k with sum_{i<k} sigma_i^2 >= energy * sum_i sigma_i^2 (values sorted, descending)."""
    if not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy}")
    power = singular_values.double().square()
    kept = power.cumsum(0) / power.sum()
    # A tiny tolerance so energy=1 does not demand the last ulp of rounding.
    return int((kept < energy - 1e-12).sum()) + 1


def factorize(
    linear: nn.Linear, *, rank: int | None = None, energy: float | None = None
) -> LowRankLinear:
    """The truncated-SVD factorisation of `linear` at `rank`, or at the rank an `energy` target
    needs (exactly one of the two)."""
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of rank or energy")
    w = linear.weight.detach()
    out_features, in_features = w.shape
    # float64: the factors should carry the truncation error only, not fp32 SVD noise.
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    k = rank if rank is not None else rank_for_energy(s, energy)
    if not 1 <= k <= min(out_features, in_features):
        raise ConfigError(
            f"rank {k} is not between 1 and min(out, in) = {min(out_features, in_features)} "
            f"for a {out_features}x{in_features} layer"
        )
    root = s[:k].sqrt()
    layer = LowRankLinear(in_features, out_features, k, bias=linear.bias is not None)
    layer.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.down.weight.copy_(root[:, None] * vh[:k])
        layer.up.weight.copy_(u[:, :k] * root)
        if linear.bias is not None:
            layer.up.bias.copy_(linear.bias)
    return layer


@dataclass
class Factorized:
    """One replaced layer: its name, rank, and weights before and after."""

    name: str
    rank: int
    params_before: int
    params_after: int


def low_rank_model(
    model: nn.Module,
    *,
    rank: int | None = None,
    energy: float | None = None,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
) -> list[Factorized]:
    """Replace, in place, every Linear whose name ends with one of `targets` by its truncated
    SVD. A layer is left as it is where the factorisation would not have fewer weights."""
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of rank or energy")
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(targets)
    ]
    if not chosen:
        raise ConfigError(f"no Linear layer of the model ends with any of {targets}")
    report = []
    for name, linear in chosen:
        # A model-wide rank is capped at each layer's own full rank.
        k = min(rank, *linear.weight.shape) if rank is not None and rank >= 1 else rank
        layer = factorize(linear, rank=k, energy=energy)
        before = linear.weight.numel()
        after = layer.down.weight.numel() + layer.up.weight.numel()
        if after >= before:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        report.append(Factorized(name, layer.rank, before, after))
    return report
