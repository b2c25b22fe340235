"""Batch-1 greedy decode speed: lmforge's `generate` vs transformers' LlamaForCausalLM.generate.

Both run the same random weights shaped like SmolLM2-135M in fp32, and are compared with the
memory-bandwidth ceiling: decoding one token reads every weight once, so tokens/s can not exceed
bandwidth / weight bytes. Run: `python benchmarks/decode.py [--threads 2 --layers 30 ...]`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.infer.generate import SamplingParams, generate
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


def to_transformers(model: Transformer) -> LlamaForCausalLM:
    """The same weights in a transformers Llama: split fused qkv and [gate; up], rename."""
    c = model.config
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.d_model,
            intermediate_size=c.ff_dim,
            num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads,
            num_key_value_heads=c.kv_heads,
            head_dim=c.dim_head,
            max_position_embeddings=c.max_seq_len,
            rms_norm_eps=c.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
    )
    q, kv = c.n_heads * c.dim_head, c.kv_heads * c.dim_head
    state = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.norm.weight,
    }
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        wq, wk, wv = block.attn.qkv.weight.split([q, kv, kv])
        gate, up = block.mlp.w_in.weight.chunk(2)
        state |= {
            p + "self_attn.q_proj.weight": wq,
            p + "self_attn.k_proj.weight": wk,
            p + "self_attn.v_proj.weight": wv,
            p + "self_attn.o_proj.weight": block.attn.out.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.mlp.w_out.weight,
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "post_attention_layernorm.weight": block.mlp_norm.weight,
        }
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


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
        hf = to_transformers(model)

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
