"""ggml tensor types: block layouts and bulk dequantization to float32 in torch.

Each quantized type stores a row as blocks of `block_size` values in `block_bytes` bytes (sizes
from the `gguf` package's GGML_QUANT_SIZES, which mirrors ggml-common.h). The common llama.cpp
types are dequantized here with whole-tensor torch ops (one pass over all blocks, no Python loop
per block), several times faster than a per-type numpy pass; rarer types (Q2_K, Q3_K, the IQ
family) fall back to the `gguf` package's numpy implementation.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from lmforge.errors import CheckpointError

QType = GGMLQuantizationType


def block_layout(qtype: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type; CheckpointError for unknown ones."""
    try:
        return GGML_QUANT_SIZES[QType(qtype)]
    except (ValueError, KeyError):
        raise CheckpointError(f"unknown ggml tensor type {qtype}") from None


def type_name(qtype: int) -> str:
    try:
        return QType(qtype).name
    except ValueError:
        return str(qtype)


def _f16(raw: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of every block, as a (blocks, 1) float32 column."""
    return raw[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, fifth_bits: torch.Tensor | None = None) -> torch.Tensor:
    """Q4_0/Q4_1/Q5 order as float32 (blocks, 32): the low nibbles of a block's 16 bytes are
    values 0..15, the high nibbles 16..31; Q5 types add a fifth bit per value. Written into one
    preallocated tensor: about twice as fast as concatenating and converting."""
    low, high = qs & 0x0F, qs >> 4
    if fifth_bits is not None:
        low, high = low | (fifth_bits[:, :16] << 4), high | (fifth_bits[:, 16:] << 4)
    q = torch.empty(qs.shape[0], 32, dtype=torch.float32)
    q[:, :16], q[:, 16:] = low, high
    return q


def _bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """Bit j (0..n-1) of the little-endian bytes `qh`, as (blocks, n) uint8 0/1."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (qh[:, :, None] >> shifts) & 1  # (blocks, bytes, 8): byte-major, bit-minor
    return bits.reshape(qh.shape[0], -1)[:, :n]


def _q8_0(raw: torch.Tensor) -> torch.Tensor:
    return _f16(raw, 0) * raw[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(raw: torch.Tensor) -> torch.Tensor:
    return _nibbles(raw[:, 2:]).sub_(8).mul_(_f16(raw, 0))


def _q4_1(raw: torch.Tensor) -> torch.Tensor:
    return _nibbles(raw[:, 4:]).mul_(_f16(raw, 0)).add_(_f16(raw, 2))


def _q5_0(raw: torch.Tensor) -> torch.Tensor:
    return _nibbles(raw[:, 6:], _bits(raw[:, 2:6], 32)).sub_(16).mul_(_f16(raw, 0))


def _q5_1(raw: torch.Tensor) -> torch.Tensor:
    return _nibbles(raw[:, 8:], _bits(raw[:, 4:8], 32)).mul_(_f16(raw, 0)).add_(_f16(raw, 2))


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit (scale, min) pairs packed in 12 bytes (ggml's get_scale_min_k4): pairs
    0-3 are the low 6 bits of bytes 0-3 / 4-7; pairs 4-7 take a nibble of bytes 8-11 plus the top
    two bits of bytes 0-3 / 4-7."""
    low_sc, low_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    high_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    high_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([low_sc, high_sc], 1).float(), torch.cat([low_m, high_m], 1).float()


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """K-quant order: each 32-byte group holds sub-block 2g in its low nibbles and 2g+1 in its
    high nibbles; returns (blocks, 8 sub-blocks, 32)."""
    g = qs.reshape(qs.shape[0], 4, 32)
    return torch.stack([g & 0x0F, g >> 4], dim=2).reshape(qs.shape[0], 8, 32)


def _q4_k(raw: torch.Tensor) -> torch.Tensor:
    sc, m = _k_scales(raw[:, 4:16])
    q = _k_nibbles(raw[:, 16:144]).float()
    y = (_f16(raw, 0) * sc)[:, :, None] * q - (_f16(raw, 2) * m)[:, :, None]
    return y.reshape(raw.shape[0], 256)


def _q5_k(raw: torch.Tensor) -> torch.Tensor:
    sc, m = _k_scales(raw[:, 4:16])
    # Bit k of qh[l] is the fifth bit of value l of sub-block k.
    high = (raw[:, 16:48, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # (blocks, 32, 8)
    q = (_k_nibbles(raw[:, 48:176]) | (high.transpose(1, 2) << 4)).float()
    y = (_f16(raw, 0) * sc)[:, :, None] * q - (_f16(raw, 2) * m)[:, :, None]
    return y.reshape(raw.shape[0], 256)


def _q6_k(raw: torch.Tensor) -> torch.Tensor:
    n = raw.shape[0]
    ql = raw[:, 0:128].reshape(n, 2, 2, 32)  # (half, first/second 32 bytes, l)
    qh = raw[:, 128:192].reshape(n, 2, 1, 32)
    # Per half of 128 values: four runs of 32 take the low/high nibbles of ql's two 32-byte
    # rows, each with two more bits from qh (shifts 0, 2, 4, 6).
    low4 = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # (n, 2, 4, 32): runs 0,1 low; 2,3 high
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[None, None, :, None]
    q = (low4 | (((qh >> shifts) & 3) << 4)).float() - 32
    scales = raw[:, 192:208].contiguous().view(torch.int8).float().reshape(n, 2, 4, 2)
    y = q.reshape(n, 2, 4, 2, 16) * scales[..., None]  # 16 values share one scale
    return _f16(raw, 208) * y.reshape(n, 256)


_TORCH_KERNELS = {
    QType.Q8_0: _q8_0,
    QType.Q4_0: _q4_0,
    QType.Q4_1: _q4_1,
    QType.Q5_0: _q5_0,
    QType.Q5_1: _q5_1,
    QType.Q4_K: _q4_k,
    QType.Q5_K: _q5_k,
    QType.Q6_K: _q6_k,
}
_PLAIN = {
    QType.F32: torch.float32,
    QType.F16: torch.float16,
    QType.BF16: torch.bfloat16,
    QType.F64: torch.float64,
    QType.I8: torch.int8,
    QType.I16: torch.int16,
    QType.I32: torch.int32,
    QType.I64: torch.int64,
}


def dequantize(data: np.ndarray | torch.Tensor, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of `shape` (torch order: last dim = ggml's ne0) from a tensor's raw bytes."""
    if isinstance(data, np.ndarray):
        # Bytes of a read-only memory map are copied (quantized sizes are small), so the result
        # never aliases the file and torch gets a writable buffer.
        data = torch.from_numpy(np.array(data, dtype=np.uint8, copy=not data.flags.writeable))
    raw = data.view(torch.uint8).reshape(-1)
    block_size, block_bytes = block_layout(qtype)
    numel = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % block_size:
        raise CheckpointError(
            f"{type_name(qtype)} rows must be a multiple of {block_size} values, got {shape[-1]}"
        )
    expected = numel // block_size * block_bytes
    if raw.numel() != expected:
        raise CheckpointError(
            f"{type_name(qtype)} tensor of shape {shape} needs {expected} bytes, has {raw.numel()}"
        )
    qtype = QType(qtype)
    if qtype in _PLAIN:
        return raw.view(_PLAIN[qtype]).to(torch.float32, copy=True).reshape(shape)
    blocks = raw.reshape(-1, block_bytes)
    if qtype in _TORCH_KERNELS:
        return _TORCH_KERNELS[qtype](blocks).reshape(shape)
    try:
        values = gguf_quants.dequantize(blocks.numpy(), qtype)
    except NotImplementedError:
        raise CheckpointError(f"cannot dequantize ggml type {qtype.name}") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
