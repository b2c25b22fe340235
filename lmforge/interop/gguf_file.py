"""A strict GGUF reader: header, metadata and tensor directory, with tensors read by memory map.

GGUF (llama.cpp's format, v2/v3): magic "GGUF", version, tensor count, metadata count, then typed
key/value pairs, then one (name, dims, ggml type, offset) entry per tensor, then the tensor data
aligned to `general.alignment` (default 32). Every count and size read from the file is checked
against the bytes that remain before anything is allocated, so a truncated or lying file gives a
CheckpointError naming the problem instead of a crash or a huge allocation.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import CheckpointError
from lmforge.interop.ggml import block_layout, dequantize, type_name

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# Metadata value types (gguf spec): struct format of each scalar type.
_SCALARS = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1"}
_NUMPY.update({10: "<u8", 11: "<i8", 12: "<f8"})


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's directory entry; shape is in torch order (ggml's ne reversed)."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.qtype)


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a valid GGUF file: {what} (at byte {self.pos})")

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining():
            raise self.fail(
                f"{what} needs {n} bytes but only {self.remaining()} remain (truncated?)"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"length of {what}")
        try:
            return str(self.take(n, what), "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype}")
        if depth > 2:
            raise self.fail(f"{what} nests arrays too deeply")
        etype, count = self.scalar("<I", f"element type of {what}"), self.scalar("<Q", what)
        # Every element takes at least one byte (a string at least its 8-byte length), so a
        # count beyond the remaining bytes is a lie caught before allocating anything.
        min_size = struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else 8
        if count * min_size > self.remaining():
            raise self.fail(f"{what} claims {count} elements, more than the file holds")
        if etype in _NUMPY:
            raw = self.take(count * min_size, what)
            array = np.frombuffer(raw, dtype=_NUMPY[etype]).copy()
            return array.astype(bool) if etype == 7 else array
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]


class GGUFFile:
    """Metadata and tensor directory of a GGUF file; `tensor(name)` dequantizes to float32."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
            raise CheckpointError(f"cannot read GGUF file {self.path}: {e}") from None
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse(_Cursor(memoryview(self._map), self.path))

    def _parse(self, cur: _Cursor) -> None:
        if bytes(cur.take(4, "magic")) != MAGIC:
            raise cur.fail("it does not start with the magic bytes 'GGUF'")
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            raise cur.fail(f"GGUF version {self.version} is not supported (only 2 and 3)")
        n_tensors, n_kv = cur.scalar("<Q", "tensor count"), cur.scalar("<Q", "metadata count")
        for _ in range(n_kv):
            key = cur.string("metadata key")
            if key in self.metadata:
                raise cur.fail(f"metadata key {key!r} appears twice")
            self.metadata[key] = cur.value(cur.scalar("<I", f"type of {key}"), key)
        entries = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.scalar("<I", f"dimension count of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
            ne = [cur.scalar("<Q", f"dimension of {name}") for _ in range(n_dims)]
            qtype, offset = (
                cur.scalar("<I", f"type of {name}"),
                cur.scalar("<Q", f"offset of {name}"),
            )
            entries.append((name, ne, qtype, offset))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-cur.pos // alignment) * alignment
        for name, ne, qtype, offset in entries:
            self._add_tensor(cur, name, ne, qtype, data_start + offset, alignment)

    def _add_tensor(
        self, cur: _Cursor, name: str, ne: list[int], qtype: int, start: int, alignment: int
    ) -> None:
        try:
            block_size, block_bytes = block_layout(qtype)
        except CheckpointError:
            raise cur.fail(f"tensor {name!r} has unknown ggml type {qtype}") from None
        if name in self.tensors:
            raise cur.fail(f"tensor {name!r} appears twice")
        if any(n == 0 for n in ne) or ne[0] % block_size:
            raise cur.fail(
                f"tensor {name!r} has dimensions {ne}; rows of {type_name(qtype)} must be a "
                f"non-zero multiple of {block_size}"
            )
        numel = 1
        for n in ne:
            numel *= n  # Python ints: no overflow for absurd dimensions
        nbytes = numel // block_size * block_bytes
        if start % alignment or start + nbytes > len(cur.buf):
            raise cur.fail(
                f"tensor {name!r} ({nbytes} bytes at offset {start}) lies outside the "
                f"{len(cur.buf)}-byte file or is misaligned (truncated?)"
            )
        self.tensors[name] = TensorInfo(name, tuple(reversed(ne)), qtype, start, nbytes)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor (a read-only view of the memory map)."""
        info = self._info(name)
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor dequantized to a new float32 torch tensor."""
        info = self._info(name)
        return dequantize(self.raw(name), info.qtype, info.shape)

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        return self.tensors[name]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise CheckpointError(f"{self.path} lacks the metadata key {key!r}")
        return self.metadata[key]
