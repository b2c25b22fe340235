"""Training throughput: lmforge's Trainer vs transformers' LlamaForCausalLM + a plain AdamW loop.

Same Llama-style shapes, fp32, sequence 256, batch 8, in one run. Prints tokens/s, the ratio, and
MFU by the PaLM formula (6N + 12*L*d*T FLOPs per token, N = every matmul weight including the
output layer) against a matmul peak measured in the same run.

    python benchmarks/train_throughput.py [--steps 4] [--rounds 3] [--sizes 7M,34M] [--compile]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.train.perf import measure_matmul_peak
from lmforge.train.trainer import TrainConfig, Trainer

# Scratch folders (HF exports, run outputs of hundreds of MB) live under one temporary folder
# that is removed when the script exits.
_SCRATCH = tempfile.TemporaryDirectory(prefix="lmforge-bench-")


def scratch() -> str:
    return tempfile.mkdtemp(dir=_SCRATCH.name)


SIZES = {
    "7M": dict(d_model=256, n_layers=4, n_heads=4, d_ff=688),
    "34M": dict(d_model=512, n_layers=8, n_heads=8, d_ff=1376),
}
VOCAB, SEQ, BATCH = 8192, 256, 8


class RandomTokens:
    """Random token batches, a pure function of the step (as the Trainer expects)."""

    def get_batch(self, batch_size, seq_len, *, seed, step, micro_step=0):
        g = torch.Generator().manual_seed(step)
        t = torch.randint(0, VOCAB, (batch_size, seq_len + 1), generator=g)
        return t[:, :-1], t[:, 1:]

    def eval_batches(self, batch_size, seq_len, max_batches):
        yield self.get_batch(batch_size, seq_len, seed=0, step=0)


def palm_flops_per_token(shape: dict) -> float:
    d, L, ff = shape["d_model"], shape["n_layers"], shape["d_ff"]
    n = L * (4 * d * d + 3 * d * ff) + VOCAB * d  # attention + SwiGLU + output layer
    return 6 * n + 12 * L * d * SEQ


def time_steps(step_fn, steps: int) -> float:
    """Tokens per second over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return steps * BATCH * SEQ / (time.perf_counter() - start)


def interleaved_rates(runners: dict, steps: int, rounds: int) -> dict[str, float]:
    """Median tokens/s of each runner over `rounds` rounds that alternate the runners, so that
    drift in the machine's speed (turbo, neighbours) hits all of them alike."""
    for fn in runners.values():  # warm-up (and compilation) outside the timing
        fn()
        fn()
    samples = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            samples[name].append(time_steps(fn, steps))
    return {name: statistics.median(rates) for name, rates in samples.items()}


def lmforge_step_fn(shape: dict, compile: bool):
    config = ModelConfig(vocab_size=VOCAB, max_seq_len=SEQ, tie_embeddings=False, **shape)
    torch.manual_seed(0)
    model = Transformer(config)
    out = scratch()
    train = TrainConfig(
        steps=10**6,
        batch_size=BATCH,
        seq_len=SEQ,
        lr=3e-4,
        warmup_steps=0,
        device="cpu",
        compile=compile,
    )
    trainer = Trainer(model, train, RandomTokens(), out)
    model.train()
    return trainer.train_step


def transformers_step_fn(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=shape["d_model"],
        num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_heads"],
        intermediate_size=shape["d_ff"],
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    data, state = RandomTokens(), {"step": 0}

    def step():
        x, y = data.get_batch(BATCH, SEQ, seed=0, step=state["step"])
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=x).logits.view(-1, VOCAB), y.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="7M,34M")
    parser.add_argument("--compile", action="store_true", help="also time lmforge + torch.compile")
    args = parser.parse_args()

    peak = measure_matmul_peak(n=2048, seconds=2.0)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}; measured fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s\n"
    )
    print(f"{'model':<6} {'runner':<22} {'tokens/s':>9} {'MFU':>6} {'vs transformers':>16}")
    for size in args.sizes.split(","):
        shape = SIZES[size]
        fpt = palm_flops_per_token(shape)
        runners = {
            "transformers+AdamW": transformers_step_fn(shape),
            "lmforge": lmforge_step_fn(shape, compile=False),
        }
        if args.compile:
            runners["lmforge (compile)"] = lmforge_step_fn(shape, compile=True)
        rates = interleaved_rates(runners, args.steps, args.rounds)
        base = rates["transformers+AdamW"]
        for name, rate in rates.items():
            print(
                f"{size:<6} {name:<22} {rate:>9,.0f} {100 * rate * fpt / peak:>5.0f}% "
                f"{rate / base:>15.2f}x"
            )


if __name__ == "__main__":
    main()
