"""NF4 with double quantization (Dettmers et al. 2023, QLoRA, section 3 and appendix E).

NormalFloat4 puts its 16 levels at quantiles of N(0, 1), so each level is equally likely for
normally distributed weights scaled into [-1, 1] by their block's absmax: 8 levels for [0, 1] and
7 for [-1, 0) (with an exact zero, the asymmetric split the paper describes), normalised so that
the extreme levels are +-1. Weights are quantized in blocks of 64, each with an fp32 absmax c2.
Double quantization then quantizes these scales too: minus their mean, in blocks of 256, to 8
bits with one fp32 scale per block, which takes the scale overhead from 32/64 = 0.5 to
8/64 + 32/(64*256) ~ 0.127 bits per weight. The paper stores the second-level codes as 8-bit
floats; we use symmetric int8 codes (simpler, and the scales' error is far below NF4's own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.compress.quantize import check_group_size, pack_int4, unpack_int4
from lmforge.errors import ConfigError
from lmforge.model.layers import _ONEDNN_LINEAR

# The 16 NF4 levels as published with QLoRA (Dettmers et al. 2023, appendix E); tests rebuild
# them from the normal quantiles.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCK, SCALE_BLOCK = 64, 256


def nf4_codes(x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level for every x in [-1, 1] (uint8 0..15)."""
    levels = torch.tensor(NF4_LEVELS, device=x.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x.float(), midpoints).to(torch.uint8)


def quantize_nf4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Blockwise NF4 codes of w (numel divisible by 64) with double-quantized absmax scales."""
    if w.numel() % BLOCK:
        raise ConfigError(f"NF4 needs a weight size divisible by its block of {BLOCK}")
    blocks = w.detach().float().reshape(-1, BLOCK)
    absmax = blocks.abs().amax(-1).clamp(min=1e-12)
    codes = nf4_codes(blocks / absmax[:, None])
    # Second level: the (positive) scales minus their mean, absmax int8 per block of 256.
    mean = absmax.mean()
    centred = absmax - mean
    pad = -centred.numel() % SCALE_BLOCK
    centred = F.pad(centred, (0, pad)).reshape(-1, SCALE_BLOCK)
    scale2 = (centred.abs().amax(-1) / 127).clamp(min=1e-12)
    scale_codes = torch.round(centred / scale2[:, None]).clamp(-127, 127).to(torch.int8)
    return {
        "codes": pack_int4(codes.reshape(-1)),
        "scale_codes": scale_codes.reshape(-1)[: absmax.numel()],
        "scale2": scale2,
        "scale_mean": mean.reshape(1),
    }


def block_scales(q: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-block absmax, recovered from its 8-bit codes: c2 ~ mean + s2 * code."""
    n = q["scale_codes"].numel()
    s2 = q["scale2"].repeat_interleave(SCALE_BLOCK)[:n]
    return q["scale_codes"].float() * s2 + q["scale_mean"]


def dequantize_nf4(q: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    levels = torch.tensor(NF4_LEVELS, device=q["codes"].device)
    values = levels[unpack_int4(q["codes"]).long()].reshape(-1, BLOCK)
    return (values * block_scales(q)[:, None]).reshape(shape)


# Rows dequantized at a time by NF4Linear's product: 2^20 weights (4 MiB in fp32), so no layer's
# fp32 weight is ever held whole, during training or inference.
CHUNK_ELEMENTS = 1 << 20


def _matmul_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x w^T: through oneDNN for fp32 on CPU, as lmforge's Linear does (about twice MKL's speed
    on the project's CPU, also for a weight it sees for the first time), else F.linear."""
    if (
        _ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == w.dtype == torch.float32
        and not torch.compiler.is_compiling()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


class _NF4Product(torch.autograd.Function):
    """x W^T for a frozen NF4 weight, dequantized a block of rows at a time, both for the output
    and for the input gradient g W (QLoRA, Dettmers et al. 2023, section 3: the base is stored
    in NF4 and dequantized to the compute dtype only when it is used). Nothing is saved for
    backward but the layer itself: a frozen weight needs no weight gradient, hence no input."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        x2 = x.reshape(-1, layer.in_features)
        ys = [_matmul_t(x2, w.to(x.dtype)) for _, w in layer.row_chunks()]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        return y.reshape(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        g2 = grad.reshape(-1, layer.out_features)
        dx = None
        for (lo, hi), w in layer.row_chunks():
            # g W over this block of rows: a product with W^T as its (out, in) weight.
            part = _matmul_t(g2[:, lo:hi].contiguous(), w.to(g2.dtype).t())
            dx = part if dx is None else dx.add_(part)
        return dx.reshape(*grad.shape[:-1], layer.in_features), None


class NF4Linear(nn.Module):
    """A linear layer whose weight is stored as NF4 with double-quantized scales (~4.13 bits per
    weight). The product dequantizes the weight a block of rows at a time and multiplies in the
    input's dtype: NF4 is a storage format (QLoRA's frozen base), with no CPU kernel of its own.
    The weight is frozen: gradients flow to the input only (lmforge.compress.qlora trains LoRA
    on top)."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool = False, device=None
    ) -> None:
        super().__init__()
        check_group_size(in_features, BLOCK, "the layer (NF4 blocks)")
        self.in_features, self.out_features = in_features, out_features
        n_blocks = in_features * out_features // BLOCK
        n_scale_blocks = -(-n_blocks // SCALE_BLOCK)
        self.register_buffer(
            "codes", torch.zeros(n_blocks * BLOCK // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scale_codes", torch.zeros(n_blocks, dtype=torch.int8, device=device))
        self.register_buffer("scale2", torch.ones(n_scale_blocks, device=device))
        self.register_buffer("scale_mean", torch.zeros(1, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        w = linear.weight.detach()
        layer = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device)
        for name, value in quantize_nf4(w).items():
            getattr(layer, name).copy_(value)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        parts = {n: getattr(self, n) for n in ("codes", "scale_codes", "scale2", "scale_mean")}
        return dequantize_nf4(parts, (self.out_features, self.in_features))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 weight, for code that reads a Linear's weight (LoRA reads its
        dtype and device). An inference tensor: writing into it raises (it is a copy, and a
        write would otherwise be silently lost), e.g. merging LoRA into an NF4 base."""
        with torch.inference_mode():
            return self.dequantized_weight()

    def row_chunks(self):
        """((first row, end row), fp32 weight rows) covering the weight, CHUNK_ELEMENTS at a
        time. A row is a whole number of NF4 blocks, so a chunk's codes and scales are
        contiguous slices of the stored ones."""
        rows = max(1, CHUNK_ELEMENTS // self.in_features)
        scales = block_scales(
            {n: getattr(self, n) for n in ("scale_codes", "scale2", "scale_mean")}
        )
        pairs = _level_pairs(self.codes.device)
        per_row = self.in_features // BLOCK
        for lo in range(0, self.out_features, rows):
            hi = min(lo + rows, self.out_features)
            packed = self.codes[lo * self.in_features // 2 : hi * self.in_features // 2]
            # One lookup per byte gives both of its levels (low nibble first, as packed).
            values = F.embedding(packed.int(), pairs).view(-1, BLOCK)
            w = values * scales[lo * per_row : hi * per_row, None]
            yield (lo, hi), w.view(hi - lo, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Product.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4 block={BLOCK}"


def _level_pairs(device) -> torch.Tensor:
    """(256, 2): the two NF4 levels packed in each byte value (low nibble, high nibble)."""
    levels = torch.tensor(NF4_LEVELS, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack([levels[byte & 15], levels[byte >> 4]], dim=-1)
