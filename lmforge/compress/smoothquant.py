"""W8A8: int8 weights and int8 activations, naive or with SmoothQuant (Xiao et al. 2023).

Activations are quantized dynamically per token (ZeroQuant, Yao et al. 2022) and weights per
output channel, then multiplied int8 x int8 (torch._int_mm, exact int32 accumulation):
Y = s_X s_W^T * (X_q W_q^T). Naively this suffers from the few input channels whose activations
are much larger than the rest. SmoothQuant migrates that difficulty into the weights with an
equivalent transform, Y = (X diag(s)^-1) (diag(s) W^T), s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
(alpha 0.5) from calibration activations (seed 002, 5.4.2). The paper folds 1/s into the
preceding LayerNorm; we keep it as a per-channel multiply inside the layer, which is the same
arithmetic and works for every linear layer (also those not behind a norm).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.compress.llm_int8 import quantize_rows, register_int8_weight, store_int8_weight
from lmforge.compress.quantize import int8_matmul

DEFAULT_ALPHA = 0.5


def smoothing_factors(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = DEFAULT_ALPHA
) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) per input channel j; weight is (out, in)."""
    w_absmax = weight.detach().abs().amax(0).float()
    s = act_absmax.float().clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-5)


class W8A8Linear(nn.Module):
    """int8 x int8 linear layer: y = (x / s) quantized per token, times diag(s) W quantized per
    output channel. s = 1 is naive W8A8."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool = False, device=None
    ) -> None:
        super().__init__()
        register_int8_weight(self, in_features, out_features, bias, device)
        self.register_buffer("smooth", torch.ones(in_features, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor | None = None) -> W8A8Linear:
        w = linear.weight.detach().float()
        layer = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device)
        if smooth is not None:
            layer.smooth.copy_(smooth)
            w = w * smooth[None, :]
        store_int8_weight(layer, w, linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_rows(x.reshape(-1, shape[-1]).float() / self.smooth)
        y = int8_matmul(xq, self.qweight).float() * xs[:, None] * self.scale[None, :]
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w8a8"
