"""GPTQ (Frantar et al. 2022): layer-wise quantization that minimises ||WX - QX||^2 (seed 002,
5.4.2, "layerwise quantization").

With the Hessian H = 2 X X^T of that loss, quantizing weight column i leaves an error that the
not-yet-quantized columns can absorb: W[:, i:] -= (w_i - q_i) / [H^-1]_ii * [H^-1]_{i, i:}
(Optimal Brain Quantization, one column at a time for all rows at once). The needed rows of the
shrinking inverse Hessians are the rows of the upper Cholesky factor of H^-1, computed once.
Updates are applied lazily: within a block of 128 columns immediately, to the columns after the
block once per block as one matrix product (memory-bound rank-1 updates become a GEMM).
H is dampened by 1% of its mean diagonal for numerical stability. act-order quantizes columns
in order of decreasing H_ii (largest activations first); its group scales are then fixed from
the original weight beforehand ("static groups"), so that groups stay contiguous in memory.
"""

from __future__ import annotations

import torch

from lmforge.compress.quantize import check_group_size, qrange, scale_and_zero


class HessianAccumulator:
    """Running H = 2/n sum_x x x^T over the n calibration vectors seen by one layer."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(in_features, in_features, device=device, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2 / self.n) ** 0.5
        self.H += x.t() @ x


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    act_order: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize weight (out, in) given the layer-input Hessian H (in, in). Returns codes (out, in),
    scale and zero (out, in // group_size); group_size = in gives one (S, Z) per output channel."""
    W = weight.detach().double().clone()
    n_out, n_in = W.shape
    check_group_size(n_in, group_size, "the layer")
    qmin, qmax = qrange(bits, symmetric)
    H = H.double().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: their weights never matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_groups = n_in // group_size
    scale = torch.zeros(n_out, n_groups, dtype=torch.float64, device=W.device)
    zero = torch.zeros_like(scale)
    if act_order:
        for g in range(n_groups):  # static groups, from the weight before any update
            cols = slice(g * group_size, (g + 1) * group_size)
            s, z = scale_and_zero(W[:, cols], bits, symmetric)
            scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
        perm = torch.argsort(H.diagonal(), descending=True)
    else:
        perm = torch.arange(n_in, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    # Rows of the upper Cholesky factor U of H^-1 (H^-1 = U^T U) are the OBQ update directions.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W)
    for b0 in range(0, n_in, block_size):
        b1 = min(b0 + block_size, n_in)
        Wb, Ub = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        errors = torch.zeros_like(Wb)
        for i in range(b1 - b0):
            col = int(perm[b0 + i])
            g = col // group_size
            if not act_order and col % group_size == 0:
                # The paper's dynamic groups: (S, Z) from the group's weights as updated so far.
                # Columns past this block have not had this block's lazy update yet.
                group = torch.cat([Wb[:, i:], W[:, b1:]], dim=1)[:, :group_size]
                s, z = scale_and_zero(group, bits, symmetric)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            w = Wb[:, i]
            q = (torch.round(w / scale[:, g]) - zero[:, g]).clamp(qmin, qmax)
            codes[:, b0 + i] = q
            err = (w - scale[:, g] * (q + zero[:, g])) / Ub[i, i]
            Wb[:, i:] -= err[:, None] * Ub[i, i:][None, :]
            errors[:, i] = err
        W[:, b1:] -= errors @ U[b0:b1, b1:]
    codes = codes[:, torch.argsort(perm)]
    return (
        codes.to(torch.int8 if symmetric or bits < 8 else torch.uint8),
        scale.float(),
        zero.float(),
    )
