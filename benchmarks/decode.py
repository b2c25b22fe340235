"""Prefill and decode speed on SmolLM2-135M-Instruct: lmforge vs transformers vs llama.cpp.

lmforge runs the GGUF file's weights dequantized to fp32; transformers runs the same fp32 weights
(lmforge's Hugging Face export of them); llama.cpp (llama-cpp-python) runs the Q4_1 file itself.
Measured in one run on the same threads: prefill tokens/s of a 200-token prompt, batch-1 decode
tokens/s over 128 greedy tokens, and aggregate decode tokens/s of 8 requests at once (lmforge's
engine and transformers' batched generate; llama-cpp-python's API decodes one sequence). The
fp32 ceiling is read bandwidth / weight bytes per token. Each figure is the best of --repeats
interleaved runs, since other processes may share the cores.

Run: `python benchmarks/decode.py [--threads 2 --repeats 3 --skip-llama-cpp]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch

import lmforge
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.interop.gguf import smollm2_path
from lmforge.interop.hf import export_hf

# Scratch folders (HF exports, run outputs of hundreds of MB) live under one temporary folder
# that is removed when the script exits.
_SCRATCH = tempfile.TemporaryDirectory(prefix="lmforge-bench-")


def scratch() -> str:
    return tempfile.mkdtemp(dir=_SCRATCH.name)


PROMPT_TEXT = (
    "Large language models are trained on vast amounts of text to predict the next token. "
    "After pre-training they are adapted with instruction tuning and alignment, then evaluated "
    "on benchmarks of knowledge, reasoning and language understanding. "
)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth: best time of torch.sum over a fp32 tensor far larger than any cache."""
    x = torch.ones(int(gib * 2**30) // 4)
    return x.numel() * 4 / min(timed(x.sum) for _ in range(repeats)) / 1e9


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n different prompts of exactly `length` tokens (a numbered copy of one passage)."""
    out = []
    for i in range(n):
        ids = tokenizer.encode(f"Document {i}. " + PROMPT_TEXT * 8)
        out.append(ids[:length])
    return out


def lmforge_runs(model, tokenizer, batch: list[list[int]], new: int) -> dict[str, Callable]:
    engine = Engine(
        model, max_batch=len(batch), max_context=len(batch[0]) + new, prefix_cache_tokens=0
    )
    greedy = SamplingParams(max_new_tokens=new, temperature=0)
    first = SamplingParams(max_new_tokens=1, temperature=0)
    return {
        "prefill": lambda: engine.generate(batch[:1], first),
        "decode1": lambda: engine.generate(batch[:1], greedy),
        "prefill8": lambda: engine.generate(batch, first),
        "decode8": lambda: engine.generate(batch, greedy),
    }


def transformers_runs(hf, batch: list[list[int]], new: int) -> dict[str, Callable]:
    one, many = torch.tensor(batch[:1]), torch.tensor(batch)

    @torch.inference_mode()
    def gen(ids: torch.Tensor, n: int) -> None:
        hf.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    return {
        "prefill": lambda: gen(one, 1),
        "decode1": lambda: gen(one, new),
        "prefill8": lambda: gen(many, 1),
        "decode8": lambda: gen(many, new),
    }


def llama_cpp_runs(
    path: str, batch: list[list[int]], new: int, threads: int
) -> dict[str, Callable]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=threads, verbose=False)
    prompt = batch[0]

    def decode(n: int) -> None:
        llm.reset()
        for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0)):
            if i + 1 == n:
                break

    def prefill() -> None:
        llm.reset()
        llm.eval(prompt)

    return {"prefill": prefill, "decode1": lambda: decode(new)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_path()
    load_seconds = timed(lambda: lmforge.load(path))
    model, tokenizer = lmforge.load(path), lmforge.load_tokenizer(path)
    batch = prompts(tokenizer, args.batch, args.prompt_len)
    n, p = args.new_tokens, args.prompt_len

    runners = {"lmforge": lmforge_runs(model, tokenizer, batch, n)}
    if not args.skip_transformers:
        from transformers import LlamaForCausalLM

        directory = scratch()
        export_hf(model, directory)
        hf = LlamaForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
        runners["transformers"] = transformers_runs(hf, batch, n)
    if not args.skip_llama_cpp:
        runners["llama.cpp Q4_1"] = llama_cpp_runs(path, batch, n, args.threads)

    best: dict[str, dict[str, float]] = {name: {} for name in runners}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, runs in runners.items():
            for what, fn in runs.items():
                seconds = timed(fn)
                if repeat:
                    best[name][what] = min(best[name].get(what, float("inf")), seconds)

    gbs = bandwidth_gbs()
    weight_bytes = model.matmul_params() * 4
    ceiling = gbs * 1e9 / weight_bytes
    print(
        f"SmolLM2-135M-Instruct, {args.threads} threads, prompt {p} tokens, {n} new tokens, "
        f"batch {args.batch}, best of {args.repeats}; GGUF load + dequantize {load_seconds:.2f} s; "
        f"fp32 weights read per token {weight_bytes / 1e6:.0f} MB, read bandwidth {gbs:.1f} GB/s"
    )
    print("| runner | prefill tok/s | decode tok/s (batch 1) | decode tok/s (batch 8, total) |")
    print("|---|---:|---:|---:|")
    rates = {}
    for name, t in best.items():
        prefill = p / t["prefill"]
        # Decode rate excludes the prefill and first token, measured separately above.
        decode1 = (n - 1) / (t["decode1"] - t["prefill"])
        decode8 = args.batch * (n - 1) / (t["decode8"] - t["prefill8"]) if "decode8" in t else None
        rates[name] = (prefill, decode1, decode8)
        d8 = f"{decode8:.1f}" if decode8 else "n/a"
        print(f"| {name} | {prefill:.0f} | {decode1:.1f} | {d8} |")
    print(f"| fp32 bandwidth ceiling | | {ceiling:.1f} | |")
    ours = rates["lmforge"]
    print(f"lmforge batch-8 aggregate / batch-1 decode: {ours[2] / ours[1]:.2f}x")
    if "transformers" in rates:
        theirs = rates["transformers"]
        print(
            f"lmforge / transformers: prefill {ours[0] / theirs[0]:.2f}x, decode "
            f"{ours[1] / theirs[1]:.2f}x, batch-8 decode {ours[2] / theirs[2]:.2f}x"
        )
    if "llama.cpp Q4_1" in rates:
        cpp = rates["llama.cpp Q4_1"]
        print(
            f"lmforge / llama.cpp: prefill {ours[0] / cpp[0]:.2f}x, decode {ours[1] / cpp[1]:.2f}x"
        )


if __name__ == "__main__":
    main()
