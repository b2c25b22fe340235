"""Engine throughput on random weights shaped like SmolLM2-135M (fp32): batch-1 decode, aggregate
decode at 8 concurrent requests, and prefill with and without a prefix-cache hit. Run: `python benchmarks/engine.py [--threads 2]`."""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer

CONFIG = ModelConfig(
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    d_ff=1536,
    max_seq_len=2048,
    rope_theta=100000,
    tie_embeddings=True,
)


def decode_rate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of the decode steps only: the first step (prefill of every prompt) is untimed."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    requests = [engine.submit(p, params) for p in prompts]
    engine.step()
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start
    return sum(len(r.generation.tokens) - 2 for r in requests) / seconds


def prefill_rate(engine: Engine, prompt: list[int]) -> float:
    start = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=0.0))
    return len(prompt) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs, best one reported")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    context = args.prompt_len + args.new_tokens
    prompts = torch.randint(0, CONFIG.vocab_size, (8, args.prompt_len)).tolist()
    engines = {"eager": Engine(model, max_batch=8, max_context=context, prefix_cache_tokens=0)}
    cached = Engine(model, max_batch=1, max_context=context, prefix_cache_tokens=512)
    shared = prompts[0][:-8]  # a 192-token "system prompt" shared by the two requests
    cached.generate([shared + prompts[1][:8]], SamplingParams(max_new_tokens=1))

    best: dict[str, float] = {}

    def keep(name: str, rate: float) -> None:
        best[name] = max(best.get(name, 0.0), rate)

    for engine in engines.values():  # warm-up (and compilation)
        decode_rate(engine, prompts[:1], 4)
        decode_rate(engine, prompts, 4)
    for _ in range(args.repeats):
        for name, engine in engines.items():
            keep(f"{name} batch-1 decode", decode_rate(engine, prompts[:1], args.new_tokens))
            keep(f"{name} 8 requests decode", decode_rate(engine, prompts, args.new_tokens))
        keep("prefill", prefill_rate(engines["eager"], prompts[2]))
        keep("prefill, 192 of 200 tokens cached", prefill_rate(cached, shared + prompts[3][:8]))
    print(
        f"SmolLM2-135M shape, fp32, {torch.get_num_threads()} threads, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, best of {args.repeats}"
    )
    for name, rate in best.items():
        print(f"| {name:36} | {rate:9.1f} tokens/s |")
    print(
        f"8 requests / batch-1: {best['eager 8 requests decode'] / best['eager batch-1 decode']:.2f}x"
    )


if __name__ == "__main__":
    main()
