"""Normalization layers and feed-forward blocks (seed 002, 4.2.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig

# Inference on CPU routes matmuls through oneDNN instead of MKL: on the 2-core AMD EPYC we measure
# on, MKL's fp32 product of one row with PyTorch's (out, in) weights streams them at ~16 GB/s and
# oneDNN at 25-38 GB/s (and oneDNN is ~2x faster for 32-1024 rows too). Decoding a token is nothing
# but such products, bound by reading the weights (benchmarks/decode.py).
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


class _FrozenLinear(torch.autograd.Function):
    """x W^T + b for a frozen W and b (LoRA and the other PEFT methods train around them): the
    forward and the input gradient run through oneDNN like inference does, about twice MKL's
    speed on the CPU above, and only the weight is kept for backward (no activation is saved:
    a frozen weight needs no weight gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        # dL/dx = g W: a linear with W^T as its (out, in) weight; oneDNN reads the transposed
        # view in place, so no copy of W is made.
        dx = torch.ops.mkldnn._linear_pointwise(grad.contiguous(), weight.t(), None, "none", [], "")
        return dx, None, None


class Linear(nn.Linear):
    """nn.Linear (same parameters, same results up to fp32 rounding) that runs fp32 CPU inference,
    and training around a frozen weight, through oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Attributes read once: a decode step runs this 121 times on SmolLM2-135M, and each
        # nn.Module attribute lookup costs about as much as a small tensor op's dispatch.
        weight, bias = self.weight, self.bias
        if (
            _ONEDNN_LINEAR
            # Plain tensors only: subclasses (DTensor, quantized weights) bring their own matmul.
            and type(x) is torch.Tensor
            and type(weight) is nn.Parameter
            and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()  # inductor picks its own kernels
        ):
            frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
            if not torch.is_grad_enabled() or (frozen and not x.requires_grad):
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
            if frozen:  # the oneDNN op has no backward of its own
                return _FrozenLinear.apply(x, weight, bias)
        return F.linear(x, weight, bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): no centring, no bias; fp32 statistics."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Low precision: normalise in fp32 as Llama does, then scale in the input dtype.
        y = F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)
        return y * self.weight


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The configured norm over `dim` features (default d_model)."""
    dim = dim or config.d_model
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def deepnorm_constants(n_layers: int, n_decoder_layers: int = 0) -> dict[str, tuple[float, float]]:
    """DeepNorm's (alpha, beta) per stack (Wang et al. 2022, DeepNet, Table 1): alpha scales the
    residual in N(alpha*x + f(x)), beta the init of the value, output and FFN projections.

    With n_decoder_layers=0 the model is one stack (decoder-only or encoder-only) of N layers:
    alpha=(2N)^(1/4), beta=(8N)^(-1/4). An encoder-decoder with N encoder and M decoder layers
    uses encoder alpha=0.81(N^4 M)^(1/16), beta=0.87(N^4 M)^(-1/16), and decoder
    alpha=(3M)^(1/4), beta=(12M)^(-1/4)."""
    N, M = n_layers, n_decoder_layers
    if not M:
        return {"blocks": ((2 * N) ** 0.25, (8 * N) ** -0.25)}
    return {
        "encoder_blocks": (0.81 * (N**4 * M) ** (1 / 16), 0.87 * (N**4 * M) ** (-1 / 16)),
        "blocks": ((3 * M) ** 0.25, (12 * M) ** -0.25),
    }


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    """Position-wise feed-forward: act(x W_in) W_out with ReLU/GeLU, or a gated linear unit
    (act(x W_gate) * x W_up) W_out with SiLU (SwiGLU) or GeLU (GeGLU) (Shazeer 2020).

    For gated units the gate and up projections are one fused matrix `w_in` = [gate; up], so one
    matmul reads the input once.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind, self.gated = config.mlp, config.gated_mlp
        hidden = config.ff_dim
        n_in = 2 * hidden if self.gated else hidden
        self.w_in = Linear(config.d_model, n_in, bias=config.bias)
        self.w_out = Linear(hidden, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = ACTIVATIONS[self.kind](gate) * up
        else:
            h = ACTIVATIONS[self.kind](h)
        return self.w_out(h)
