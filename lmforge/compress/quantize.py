"""Quantization primitives (seed 002, 5.4.1): x_q = R(x/S) - Z, and back, x ~ S * (x_q + Z).

S is the scale and Z the zero-point. Symmetric (absmax) quantization has Z = 0 and a range
symmetric about zero, [-(2^(b-1) - 1), 2^(b-1) - 1]; asymmetric quantization maps [min, max] onto
the unsigned range [0, 2^b - 1] with an integer Z, so zero stays exactly representable. One (S, Z)
is shared by a whole tensor, an output channel (a weight row), a token (an activation row) or a
group of `group_size` consecutive inputs of a row (ZeroQuant's fine-grained scheme, group 128).
R is round-to-nearest or stochastic rounding (unbiased: E[R(y)] = y).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lmforge.errors import ConfigError

Granularity = Literal["tensor", "channel", "token", "group"]
Rounding = Literal["nearest", "stochastic"]
GRANULARITIES = ("tensor", "channel", "token", "group")


@dataclass
class QuantizedTensor:
    """Integer codes (int8; uint8 for 8-bit asymmetric; unpacked) with the scale and zero-point
    to dequantize them: one (S, Z) per quantization unit, shaped to broadcast against the codes
    as `_grouped` views them (for groups: the last dim split into groups of group_size)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    symmetric: bool
    granularity: str
    group_size: int


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range of b-bit codes: symmetric [-(2^(b-1)-1), 2^(b-1)-1] (restricted, so
    that +-absmax are both representable), asymmetric [0, 2^b - 1]."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"bits must be an integer from 2 to 8, got {bits!r}")


def check_group_size(in_features: int, group_size: int, what: str = "a row") -> None:
    """Groups must tile the input dimension exactly: a partial last group would need its own
    special case in every kernel."""
    if group_size < 1 or in_features % group_size:
        raise ConfigError(
            f"group_size {group_size} does not divide the {in_features} inputs of {what}; "
            f"choose a divisor of {in_features} (e.g. "
            f"{', '.join(str(g) for g in (32, 64, 128, 256) if in_features % g == 0) or 1})"
        )


def _grouped(x: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """x viewed so that every quantization unit is reduced over dims (-1,) [or all dims]."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":  # one unit per output channel: a weight's rows (dim 0)
        return x.reshape(x.shape[0], -1)
    if granularity == "token":  # one unit per token: every leading index of an activation
        return x
    check_group_size(x.shape[-1], group_size)
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def round_(y: torch.Tensor, rounding: Rounding, generator: torch.Generator | None) -> torch.Tensor:
    """Round-to-nearest, or stochastic rounding floor(y + u), u ~ U[0, 1): rounds up with
    probability frac(y), so the rounding error has mean zero."""
    if rounding == "nearest":
        return torch.round(y)
    if rounding == "stochastic":
        return torch.floor(y + torch.rand(y.shape, generator=generator, device=y.device))
    raise ConfigError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")


def scale_and_zero(
    x: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, Z) per unit of x grouped by `_grouped`: the last dim is reduced."""
    qmin, qmax = qrange(bits, symmetric)
    x = x.float()
    if symmetric:
        scale = x.abs().amax(-1, keepdim=True) / qmax
        return scale.clamp(min=1e-12), torch.zeros_like(scale)
    # The range always contains 0, so that zero (padding, ReLU outputs) quantizes exactly.
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-12)
    # x_q(lo) = R(lo/S) - Z = qmin  =>  Z = R(lo/S) - qmin
    return scale, torch.round(lo / scale) - qmin


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    *,
    symmetric: bool = True,
    granularity: Granularity = "channel",
    group_size: int = 128,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> QuantizedTensor:
    """Quantize x to `bits`-bit integer codes, x_q = clamp(R(x/S) - Z, qmin, qmax)."""
    qmin, qmax = qrange(bits, symmetric)
    grouped = _grouped(x, granularity, group_size)
    scale, zero = scale_and_zero(grouped, bits, symmetric)
    q = (round_(grouped.float() / scale, rounding, generator) - zero).clamp(qmin, qmax)
    q = q.to(torch.int8 if symmetric or bits < 8 else torch.uint8).reshape(x.shape)
    return QuantizedTensor(q, scale, zero, bits, symmetric, granularity, group_size)


def dequantize(t: QuantizedTensor) -> torch.Tensor:
    """x ~ S * (x_q + Z), in fp32 with the codes' shape."""
    grouped = _grouped(t.q, t.granularity, t.group_size)
    return ((grouped.float() + t.zero) * t.scale).reshape(t.q.shape)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim: element 2i in the low nibble, 2i+1 in the
    high one. Codes are unsigned 0..15 (add 8 to symmetric codes first)."""
    if codes.shape[-1] % 2:
        raise ConfigError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.int16)
    if c.numel() and (c.min() < 0 or c.max() > 15):
        raise ValueError("int4 codes must lie in 0..15")
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 (..., n/2) -> codes 0..15 as uint8 (..., n)."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 product of int8 matrices a (M, K) and b (N, K)^T: torch._int_mm where it
    exists (a real int8 x int8 kernel on CPU and GPU), else float64 (exact: sums < 2^53)."""
    if hasattr(torch, "_int_mm") and a.shape[0] > 0:
        return torch._int_mm(a.contiguous(), b.t())
    return (a.double() @ b.double().t()).to(torch.int32)
