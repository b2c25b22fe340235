"""Throughput accounting: peak FLOP/s of the device and model FLOPs utilization (MFU)."""

from __future__ import annotations

import time

import torch

# Dense bf16 peaks from vendor data sheets (no sparsity), for MFU on known GPUs.
_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def measure_matmul_peak(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    n: int = 1024,
    seconds: float = 0.5,
) -> float:
    """Achieved FLOP/s of square matmuls: the practical peak MFU is measured against on CPUs."""
    # A private generator: measuring must not move the global RNG that training depends on.
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Data-sheet bf16 peak for known GPUs, else a measured matmul peak."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAK_BF16.items():
            if key in name:
                return peak
    return measure_matmul_peak(device, dtype)


def peak_memory_bytes(device: torch.device) -> int:
    """High-water mark of memory: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
