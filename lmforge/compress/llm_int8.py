"""LLM.int8() (Dettmers et al. 2022): mixed-precision decomposition around outlier features.

Past ~6.7B parameters a few hidden dimensions carry activations of magnitude 20-100 in nearly
every token; quantizing them with the rest blows up every row's absmax scale. LLM.int8() splits
the product by input dimension: the dimensions where any token has |x| > threshold (6.0) are
multiplied in floating point, the rest in int8 with vector-wise scales (one per token of X, one
per output channel of W):  Y = X_O W_O^T + s_X s_W^T * (X_q W_q^T)  (seed 002, 5.4.2).
As in bitsandbytes' inference mode the weight is stored once, in int8; its outlier columns are
dequantized for the floating-point part. The int8 x int8 product is real (torch._int_mm).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.compress.quantize import int8_matmul, quantize

DEFAULT_THRESHOLD = 6.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) absmax int8: codes (M, K) and scales (M,), ZeroQuant's dynamic
    token-wise activation quantization."""
    t = quantize(x, 8, symmetric=True, granularity="token")
    return t.q, t.scale.squeeze(-1)


def register_int8_weight(
    layer: nn.Module, in_features: int, out_features: int, bias: bool, device
) -> None:
    """The buffers of a per-output-channel int8 weight (`qweight`, `scale`) and optional `bias`
    that `store_int8_weight` fills: LLM.int8()'s and W8A8's layers hold the same."""
    layer.in_features, layer.out_features = in_features, out_features
    layer.register_buffer(
        "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
    )
    layer.register_buffer("scale", torch.ones(out_features, device=device))
    layer.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)


def store_int8_weight(layer: nn.Module, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Write `w` into `layer.qweight` / `layer.scale` as symmetric per-output-channel int8 (the
    weight half of LLM.int8() and of W8A8), and copy the bias."""
    t = quantize(w, 8, symmetric=True, granularity="channel")
    layer.qweight.copy_(t.q)
    layer.scale.copy_(t.scale.reshape(-1))
    if bias is not None:
        layer.bias.copy_(bias.detach())


class LLMInt8Linear(nn.Module):
    """Linear layer with an int8 weight (per output channel) and LLM.int8()'s outlier split."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        threshold: float = DEFAULT_THRESHOLD,
        device=None,
    ) -> None:
        super().__init__()
        register_int8_weight(self, in_features, out_features, bias, device)
        self.register_buffer("threshold", torch.tensor(float(threshold), device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD) -> LLMInt8Linear:
        w = linear.weight.detach()
        layer = cls(
            w.shape[1],
            w.shape[0],
            bias=linear.bias is not None,
            threshold=threshold,
            device=w.device,
        )
        store_int8_weight(layer, w, linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        outliers = (x2.abs() > self.threshold).any(0)  # input dimensions, over all tokens
        y = torch.zeros(x2.shape[0], self.out_features, device=x.device)
        if outliers.any():
            w_outliers = self.qweight[:, outliers].float() * self.scale[:, None]
            y = x2[:, outliers] @ w_outliers.t()
            x2 = x2.masked_fill(outliers, 0.0)
        xq, xs = quantize_rows(x2)
        y = y + int8_matmul(xq, self.qweight).float() * xs[:, None] * self.scale[None, :]
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, threshold={self.threshold:g}"
