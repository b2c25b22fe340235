"""Weight-only quantized linear layers for inference: int8 per output channel, int4 group-wise.

Decoding one token reads every weight once, so its speed is bound by weight bytes: int8 reads a
quarter of fp32's, int4 an eighth. On CPU the products run in PyTorch's weight-only kernels,
`_weight_int8pack_mm` (y = x @ (W_q * s)^T) and `_weight_int4pack_mm_for_cpu` (tinygemm's
form, w = (q - 8) * scale + zero per group, on a weight repacked by
`_convert_weight_to_int4pack_for_cpu`).
Both are vectorised for bf16 activations only: with fp32 activations they fall back to a scalar
loop 5-40x slower than our fp32 matmul (measured on the project's 2-core EPYC, torch 2.13), so the
kernel path rounds activations to bf16 (8 mantissa bits, a relative error of 2^-9, below int8's
weight error) and returns fp32. Elsewhere (GPU, autograd, other dtypes) the layer dequantizes its
weight and runs an ordinary matmul, which is exact with respect to the stored codes.

Memory: an int4 layer holds its codes in one form at a time. The portable form (`qweight`, two
codes a byte in row order, what checkpoints store) is repacked into the kernel's layout on the
first kernel call and then dropped, so a decoding model keeps ~0.69 bytes a weight (0.5 of codes,
fp32 scale and zero-point per group of 64) instead of 1.19 with both copies. `state_dict`
rebuilds the portable codes from the kernel's (the repacking is a fixed permutation of nibbles,
recovered by `_kernel_order`), so saving is unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.compress.quantize import (
    check_group_size,
    pack_int4,
    quantize,
    unpack_int4,
)
from lmforge.errors import ConfigError

_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored as int8 codes and one scale per output channel (symmetric,
    bits=8), or as packed int4 codes with a scale and an integer zero-point per group of
    `group_size` inputs (asymmetric, bits=4): W ~ S * (W_q + Z) (lmforge.compress.quantize)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int = 128,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ConfigError(f"weight-only quantized layers have 8 or 4 bits, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else in_features
        n, k = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.ones(n, device=device))
        else:
            check_group_size(k, group_size, "the layer")
            groups = k // group_size
            self.register_buffer(
                "qweight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device)
            )
            self.register_buffer("scale", torch.ones(n, groups, device=device))
            self.register_buffer("zero", torch.zeros(n, groups, device=device))
        self.register_buffer("bias", torch.zeros(n, device=device) if bias else None)
        self.use_kernel = True  # False: always dequantize (the reference path; tests compare)
        # The kernel's own layout, built lazily; for int4 it replaces qweight (set to None).
        self._kernel_weight: torch.Tensor | None = None
        self._kernel_scale: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128) -> QuantizedLinear:
        """Round-to-nearest quantization of an fp linear layer's weight."""
        w = linear.weight.detach()
        layer = cls(
            w.shape[1],
            w.shape[0],
            bits=bits,
            group_size=group_size,
            bias=linear.bias is not None,
            device=w.device,
        )
        if bits == 8:
            t = quantize(w, 8, symmetric=True, granularity="channel")
            layer.set_codes(t.q, t.scale.reshape(-1))
        else:
            t = quantize(w, 4, symmetric=False, granularity="group", group_size=group_size)
            layer.set_codes(t.q, t.scale.squeeze(-1), t.zero.squeeze(-1))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def set_codes(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None
    ) -> None:
        """Store codes (out, in) with scale (out,) [bits 8] or scale and zero (out, groups)."""
        with torch.no_grad():
            if self.bits == 8:
                self.qweight.copy_(codes.to(torch.int8))
                self.scale.copy_(scale.reshape(self.scale.shape))
            else:
                self.qweight = pack_int4(codes.to(torch.uint8)).to(self.scale.device)
                self.scale.copy_(scale.reshape(self.scale.shape))
                self.zero.copy_(zero.reshape(self.zero.shape))
        self._kernel_weight = self._kernel_scale = None

    def codes(self) -> torch.Tensor:
        """The integer codes (out, in): int8 for 8 bits, 0..15 (uint8) for 4 bits."""
        if self.bits == 8:
            return self.qweight
        return unpack_int4(self._portable_qweight())

    def _portable_qweight(self) -> torch.Tensor:
        """qweight as checkpoints store it, rebuilt from the kernel's layout if it was dropped."""
        if self.qweight is not None:
            return self.qweight
        packed = self._kernel_weight
        nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1)
        codes = torch.empty_like(nibbles)
        codes[_kernel_order(self.out_features, self.in_features)] = nibbles
        return pack_int4(codes.view(self.out_features, self.in_features))

    def _use_portable(self) -> None:
        # The dequantizing path reads the portable codes: switch back to them for good.
        if self.qweight is None:
            self.qweight = self._portable_qweight()
            self._kernel_weight = self._kernel_scale = None

    def dequantized_weight(self) -> torch.Tensor:
        """W ~ S * (W_q + Z) in fp32, (out, in)."""
        if self.bits == 8:
            return self.qweight.float() * self.scale[:, None]
        q = self.codes().float().view(self.out_features, -1, self.group_size)
        w = (q + self.zero[..., None]) * self.scale[..., None]
        return w.reshape(self.out_features, self.in_features)

    def _build_kernel_weight(self) -> None:
        if self.bits == 8:
            self._kernel_weight = self.qweight
            self._kernel_scale = self.scale.to(torch.bfloat16)
            return
        # tinygemm wants w = (q - 8) * scale + zero': with w = S (q + Z), zero' = S (Z + 8).
        codes = self.codes().to(torch.int32)
        self._kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        self.qweight = None  # the kernel's copy is now the only one (see the module docstring)
        zero = self.scale * (self.zero + 8)
        self._kernel_scale = (
            torch.stack([self.scale, zero], dim=-1).transpose(0, 1).contiguous().bfloat16()
        )  # (groups, out, 2)

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        return (
            self.use_kernel
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and x.requires_grad)
            and (_INT8_KERNEL if self.bits == 8 else _INT4_KERNEL and self.out_features % 16 == 0)
        )  # the int4 repacking takes 16 rows at a time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._kernel_ok(x):
            self._use_portable()
            return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        if self._kernel_weight is None:
            self._build_kernel_weight()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self._kernel_weight, self._kernel_scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self._kernel_weight, self.group_size, self._kernel_scale
            )
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight is None:  # int4 codes held in the kernel's layout only
            destination[prefix + "qweight"] = self._portable_qweight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.qweight is None:  # a slot for the portable codes being loaded
            n, k = self.out_features, self.in_features
            self.qweight = torch.empty(n, k // 2, dtype=torch.uint8, device=self.scale.device)
        self._kernel_weight = self._kernel_scale = None
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() move the portable codes; the kernel layout is rebuilt on the next call.
        self._use_portable()
        self._kernel_weight = self._kernel_scale = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}{group}"


def _kernel_order(n: int, k: int) -> torch.Tensor:
    """For the int4 kernel's packing of an (n, k) code matrix, the row-major index of the code
    held in each nibble (the packed bytes' nibbles in order, low first). PyTorch does not
    document the layout (it depends on the CPU's vector width), so it is measured: packing a
    matrix whose codes are base-16 digit j of each element's own index gives digit j of the
    source index in every nibble."""
    index = torch.arange(n * k).view(n, k)
    order = torch.zeros(n * k, dtype=torch.long)
    for j in range(max(1, math.ceil(math.log2(n * k) / 4))):
        digit = ((index >> (4 * j)) & 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 2)
        order += torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1).long() << (4 * j)
    return order
