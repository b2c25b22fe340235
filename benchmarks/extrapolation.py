"""Length extrapolation (survey 4.2.4, "Long Context"): one tiny causal decoder trained at length L
with each position scheme, then validation perplexity at L, 2L and 4L on the same tokens.

Corpus: lmforge's default corpus (the Python docs, lmforge.data.default_corpus), a byte-level BPE
trained on it, token shards as `lmforge run` writes them. Learned absolute positions have no
embedding rows trained past L, so they cannot extrapolate by construction (their rows beyond L
keep the random init). Writes docs/extrapolation.png and prints a Markdown table.

    python benchmarks/extrapolation.py [--length 64] [--steps 300] [--out runs/bench_extrapolation]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import torch

from lmforge.data.default_corpus import default_documents
from lmforge.data.shards import TokenShards, write_shards
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_bpe
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.optim import cosine_schedule

POSITIONS = ("sinusoidal", "learned", "rope", "t5_bias", "alibi")


def shards(out: Path, docs: int, vocab: int) -> TokenShards:
    """Token shards of the first `docs` default-corpus documents (built once, then reused)."""
    directory = out / "shards"
    if not (directory / "index.json").is_file():
        texts = [d["text"] for d in itertools.islice(default_documents(), docs)]
        tokenizer = train_bpe(texts, vocab)
        write_shards(texts, tokenizer, directory, val_fraction=0.05, overwrite=True)
        tokenizer.save(directory)
    return TokenShards(directory, "train")


def train(position: str, data: TokenShards, args) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=data.vocab_size,
        d_model=128,
        n_layers=2,
        n_heads=4,
        max_seq_len=4 * args.length,
        position=position,
        mlp="gelu",
        norm="layernorm",
    )
    model = Transformer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_schedule(
                step,
                peak_lr=args.lr,
                warmup_steps=args.steps // 10,
                total_steps=args.steps,
                min_lr_ratio=0.1,
            )
        batch = data.get_batch(args.batch, args.length, seed=0, step=step)
        loss = causal_lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def perplexity(model: Transformer, val: TokenShards, length: int, tokens: int) -> float:
    """exp(mean next-token loss) over the first `tokens` validation targets, in non-overlapping
    windows of `length`: every length sees the same tokens."""
    windows = tokens // length
    losses = [
        causal_lm_loss(model, batch).item()
        for batch in val.eval_batches(windows, length, max_batches=1)
    ]
    return math.exp(losses[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=64, help="training length L")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--docs", type=int, default=3000, help="default-corpus documents")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--out", default="runs/bench_extrapolation")
    parser.add_argument("--plot", default="docs/extrapolation.png")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    data = shards(out, args.docs, args.vocab)
    val = TokenShards(out / "shards", "validation")
    lengths = [args.length, 2 * args.length, 4 * args.length]
    print(
        f"train tokens {data.n_tokens:,}, validation tokens {val.n_tokens:,}, "
        f"vocab {data.vocab_size}, L={args.length}, {args.steps} steps x {args.batch}"
    )
    table = {}
    for position in POSITIONS:
        start = time.perf_counter()
        model = train(position, data, args)
        table[position] = [perplexity(model, val, n, args.eval_tokens) for n in lengths]
        row = ", ".join(f"{p:.1f}" for p in table[position])
        print(f"{position}: {row} ({time.perf_counter() - start:.0f}s)", flush=True)

    print("\n| positions | " + " | ".join(f"ppl @ {n}" for n in lengths) + " | 4L / L |")
    print("|---|" + "---:|" * (len(lengths) + 1))
    for position, ppl in table.items():
        cells = " | ".join(f"{p:.1f}" for p in ppl)
        print(f"| {position} | {cells} | {ppl[-1] / ppl[0]:.2f} |")
    best = min(table, key=lambda p: table[p][-1] / table[p][0])
    print(f"\nflattest from L to 4L: {best}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for position, ppl in table.items():
        ax.plot(lengths, ppl, marker="o", label=position)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [f"{n} ({n // args.length}L)" for n in lengths])
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"Trained at L={args.length}: extrapolation by position scheme")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
