"""Attention cost on CPU: time and peak memory of one causal Transformer layer's forward pass with
full, sliding-window and block-sparse attention as the sequence grows (T = 512 ... 8192).

Everything runs through the model (lmforge.model.Transformer, 1 layer, d_model 64, 2 heads),
so the mask construction is measured too. Kernels: full attention is SDPA with is_causal (no mask
tensor); sparse attention is either SDPA with a dense boolean (T, T) mask ("sdpa") or compiled
flex_attention with a block mask that skips 128 x 128 tiles without an allowed pair ("flex").
Peak memory is the rise of the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) over one forward pass, after a warm-up pass (flex compiles there).

    python benchmarks/attention_cost.py [--lengths 512,1024,2048,4096,8192] [--reps 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.model.attention import _FLEX, attention_pattern

WINDOW, BLOCK = 256, 128
VARIANTS = {
    "full (SDPA causal)": dict(attention="full"),
    "sliding (SDPA, dense mask)": dict(attention="sliding", window=WINDOW, sparse_kernel="sdpa"),
    "sliding (flex)": dict(attention="sliding", window=WINDOW, sparse_kernel="flex"),
    "block-sparse (SDPA, dense mask)": dict(attention="block_sparse", sparse_block=BLOCK),
    "block-sparse (flex)": dict(attention="block_sparse", sparse_block=BLOCK, sparse_kernel="flex"),
}


def _status(key: str) -> int:
    """A /proc/self/status memory field in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key))
    return int(line.split()[1]) * 1024


def allowed_pairs(T: int, variant: dict) -> int:
    """Query-key pairs the pattern allows (the FLOPs a perfect sparse kernel would spend)."""
    config = ModelConfig(
        max_seq_len=T, **{k: v for k, v in variant.items() if k != "sparse_kernel"}
    )
    q = torch.arange(T)[:, None]
    return int(attention_pattern(config, q, torch.arange(T)[None], causal=True).sum())


def measure(variant: dict, T: int, reps: int) -> tuple[float, int]:
    """(median seconds, peak bytes) of one forward pass at length T."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=256, d_model=64, n_layers=1, n_heads=2, d_ff=128, max_seq_len=T, **variant
    )
    model = Transformer(config).eval()
    ids = torch.randint(0, 256, (1, T))
    with torch.no_grad():
        model(ids, hidden_only=True)  # warm-up (flex_attention compiles here)
        gc.collect()
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            model(ids, hidden_only=True)
            times.append(time.perf_counter() - start)
        peak = _status("VmHWM") - before
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # Large buffers straight from mmap, so a freed (T, T) tensor leaves the RSS at once and
        # the next measurement's high-water mark is its own.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    # flex_attention compiles once per sequence length; allow all of them.
    torch._dynamo.config.recompile_limit = 64
    lengths = [int(n) for n in args.lengths.split(",")]
    results = {}
    for name, variant in VARIANTS.items():
        for T in lengths:
            results[name, T] = measure(variant, T, args.reps)
            seconds, peak = results[name, T]
            if "flex" in name and _FLEX["failed"]:
                raise SystemExit("flex_attention did not run here (see the warning); no result")
            print(
                f"{name:<32} T={T:<5} {seconds * 1e3:9.1f} ms {peak / 2**20:8.1f} MiB", flush=True
            )

    header = " | ".join(f"T={T}" for T in lengths)
    print(
        f"\nTime (ms) per forward pass\n\n| attention | {header} | growth {lengths[0]}->{lengths[-1]} |"
    )
    print("|---|" + "---:|" * (len(lengths) + 1))
    for name in VARIANTS:
        cells = [results[name, T][0] * 1e3 for T in lengths]
        growth = cells[-1] / cells[0]
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {growth:.0f}x |")
    print(f"\nPeak memory (MiB) over the forward pass\n\n| attention | {header} |")
    print("|---|" + "---:|" * len(lengths))
    for name in VARIANTS:
        cells = [results[name, T][1] / 2**20 for T in lengths]
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    print(f"\nAllowed query-key pairs (millions)\n\n| pattern | {header} |")
    print("|---|" + "---:|" * len(lengths))
    for name in ("full (SDPA causal)", "sliding (flex)", "block-sparse (flex)"):
        cells = [allowed_pairs(T, VARIANTS[name]) / 1e6 for T in lengths]
        print(f"| {name.split(' ')[0]} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    ratio = lengths[-1] / lengths[0]
    print(f"\n(T grows {ratio:.0f}x: linear growth is {ratio:.0f}x, quadratic {ratio**2:.0f}x)")


if __name__ == "__main__":
    main()
