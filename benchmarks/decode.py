"""Batch-1 greedy decode speed: lmforge's `generate` vs transformers' LlamaForCausalLM.generate.

Both run the same random weights shaped like SmolLM2-135M in fp32, and are compared with the
memory-bandwidth ceiling: decoding one token reads every weight once, so tokens/s can not exceed
bandwidth / weight bytes. Run: `python benchmarks/decode.py [--threads 2 --layers 30 ...]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import LlamaForCausalLM

from lmforge.infer.generate import SamplingParams, generate
from lmforge.interop.hf import export_hf
from lmforge.model import ModelConfig, Transformer


def smollm2_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab,
        d_model=576,
        n_layers=args.layers,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        d_ff=1536,
        max_seq_len=2048,
        norm="rmsnorm",
        mlp="swiglu",
        position="rope",
        rope_theta=100000.0,
        tie_embeddings=True,
    )


def to_transformers(model: Transformer, directory: str) -> LlamaForCausalLM:
    """The same weights in a transformers Llama, through lmforge's own Hugging Face export."""
    export_hf(model, directory)
    return LlamaForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()


def bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth: best time of torch.sum over a fp32 tensor far larger than any cache."""
    x = torch.ones(int(gib * 2**30) // 4)
    return x.numel() * 4 / min(timed(x.sum) for _ in range(repeats)) / 1e9


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs each, best one reported")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = Transformer(smollm2_config(args)).eval()
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len))
    n = args.new_tokens
    params = SamplingParams(max_new_tokens=n, temperature=0.0)
    runs = {"lmforge": lambda: generate(model, prompt.tolist(), params)[0].tokens}
    if not args.skip_transformers:
        hf = to_transformers(model, tempfile.mkdtemp())

        @torch.inference_mode()
        def run_transformers() -> list[int]:
            kw = {"max_new_tokens": n, "min_new_tokens": n, "pad_token_id": 0}
            return hf.generate(prompt, do_sample=False, **kw)[0, args.prompt_len :].tolist()

        runs["transformers"] = run_transformers

    outputs = {name: run() for name, run in runs.items()}  # warm-up
    assert all(len(tokens) == n for tokens in outputs.values())
    # Other processes share the 2 cores: interleave the runs and keep each one's best.
    seconds = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds[name] = min(seconds[name], timed(run))

    gbs = bandwidth_gbs()
    weight_bytes = model.matmul_params() * model.embed.weight.element_size()
    ceiling = gbs * 1e9 / weight_bytes
    print(
        f"{args.layers} layers, fp32, {torch.get_num_threads()} threads, prompt {args.prompt_len}, "
        f"{n} new tokens, best of {args.repeats}; weights read per token "
        f"{weight_bytes / 1e6:.0f} MB, read bandwidth {gbs:.1f} GB/s"
    )
    if len(outputs) == 2:
        print(f"same greedy tokens: {outputs['lmforge'] == outputs['transformers']}")
    print(f"| {'':12} | {'tokens/s':>9} | {'of ceiling':>10} |")
    print(f"|{'-' * 14}|{'-' * 11}|{'-' * 12}|")
    for name, secs in seconds.items():
        print(f"| {name:12} | {n / secs:9.2f} | {n / secs / ceiling:10.0%} |")
    print(f"| {'ceiling':12} | {ceiling:9.2f} | {1:10.0%} |")
    if len(seconds) == 2:
        print(f"lmforge / transformers: {seconds['transformers'] / seconds['lmforge']:.2f}x")


if __name__ == "__main__":
    main()
