"""Batch-1 decode speed of weight-only quantized SmolLM2-135M: fp32 vs int8 vs int4, one run.

The same Engine (lmforge/infer/engine.py) decodes with the fp32 model (the GGUF's weights
dequantized), int8 RTN per channel and int4 RTN group-wise; llama.cpp (llama-cpp-python) on the
Q4_1 file itself is the peer. SmolLM2's width, 576, is not a multiple of 128, so int4 uses groups
of 64 (Q4_1's blocks are 32). Prefill and decode reuse benchmarks/decode.py's measurements;
each figure is the best of --repeats interleaved rounds, since other processes share the cores.

Run: `python benchmarks/quant_decode.py [--threads 2 --repeats 3 --group-size 64]`.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import llama_cpp_runs, lmforge_runs, prompts, timed  # noqa: E402

import lmforge  # noqa: E402
from lmforge.compress.quantized_model import quantize_model  # noqa: E402
from lmforge.interop.gguf import smollm2_path  # noqa: E402


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors the matmuls read per token: every linear layer's stored weight
    (codes, scales, zero-points); a tied fp32 output layer counts once, as the embedding."""
    total = 0
    for name, module in model.named_modules():
        is_leaf = not any(True for _ in module.children())
        if is_leaf and (name.startswith("blocks.") or name == "lm_head"):
            total += sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return total


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes the linear layers hold in memory after decoding: their tensors plus any kernel
    layout (an int4 layer keeps only the kernel's copy of its codes), each storage once."""
    seen: dict[int, int] = {}
    for name, module in model.named_modules():
        if not (name.startswith("blocks.") or name == "lm_head"):
            continue
        extra = [getattr(module, a, None) for a in ("_kernel_weight", "_kernel_scale")]
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False), *extra]:
            if t is not None:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_path()
    fp32, tokenizer = lmforge.load(path), lmforge.load_tokenizer(path)
    batch = prompts(tokenizer, 1, args.prompt_len)
    n, p = args.new_tokens, args.prompt_len
    models = {
        "lmforge fp32": fp32,
        "lmforge int8 RTN": quantize_model(copy.deepcopy(fp32), "rtn", 8),
        f"lmforge int4 RTN g{args.group_size}": quantize_model(
            copy.deepcopy(fp32), "rtn", 4, args.group_size
        ),
        # NF4 (QLoRA's storage type) has no CPU kernel: each product dequantizes a block of rows.
        "lmforge NF4": quantize_model(copy.deepcopy(fp32), "nf4", 4),
    }
    runners = {name: lmforge_runs(m, tokenizer, batch, n) for name, m in models.items()}
    runners = {name: {k: r[k] for k in ("prefill", "decode1")} for name, r in runners.items()}
    if not args.skip_llama_cpp:
        runners["llama.cpp Q4_1"] = llama_cpp_runs(path, batch, n, args.threads)

    best: dict[str, dict[str, float]] = {name: {} for name in runners}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, runs in runners.items():
            for what, fn in runs.items():
                seconds = timed(fn)
                if repeat:
                    best[name][what] = min(best[name].get(what, float("inf")), seconds)

    print(
        f"SmolLM2-135M-Instruct, {args.threads} threads, prompt {p} tokens, {n} new tokens, "
        f"batch 1, best of {args.repeats}"
    )
    print("| runner | linear weights MB | resident MB | prefill tok/s | decode tok/s "
          "| decode vs fp32 |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    base = None
    for name, t in best.items():
        prefill = p / t["prefill"]
        decode = (n - 1) / (t["decode1"] - t["prefill"])
        base = base or decode
        if name in models:
            size = (
                f"{linear_bytes(models[name]) / 1e6:.0f} | {resident_bytes(models[name]) / 1e6:.0f}"
            )
        else:
            size = "(Q4_1 file) | -"
        print(f"| {name} | {size} | {prefill:.0f} | {decode:.1f} | {decode / base:.2f}x |")


if __name__ == "__main__":
    main()
