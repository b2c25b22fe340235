"""GGUF export, pruning and low-rank factorisation of a trained model: size and quality cost.

For a trained lmforge model (e.g. the demo model of `lmforge run`, given as --model) and its
token shards (--data): validation loss (mean next-token cross-entropy over the same windows) of
  - the exported GGUF files (f32, f16, q8_0, q4_0) run by llama.cpp (llama-cpp-python), beside
    lmforge on the same files, and the file sizes;
  - magnitude pruning (global) and structured pruning (Taylor importance), before and after a
    short recovery fine-tune, with parameter counts;
  - low-rank factorisation at energy targets.
Numbers depend on the model and data; timings are not the point here (the CPU is shared).

Run: `python benchmarks/compress_export.py --model RUN_DIR --data RUN_DIR/shards`.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

import lmforge
from lmforge.compress.lowrank import low_rank_model
from lmforge.compress.prune import (
    magnitude_prune,
    recover,
    sparsity,
    structured_prune,
    unit_importance,
)
from lmforge.data.shards import TokenShards
from lmforge.interop.gguf_export import export_gguf
from lmforge.train.objectives import causal_lm_loss


def windows(data: str, seq_len: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(TokenShards(data, "validation").eval_batches(1, seq_len, n))


def val_loss(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        return float(np.mean([causal_lm_loss(model, b).item() for b in batches]))


def llama_cpp_loss(path: Path, batches, seq_len: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=seq_len, logits_all=True, verbose=False, n_threads=2
    )
    losses = []
    for x, y in batches:
        llm.reset()
        llm.eval(x[0].tolist())
        logits = torch.from_numpy(np.array(llm.scores[: x.shape[1]]))
        losses.append(torch.nn.functional.cross_entropy(logits, y[0]).item())
    return float(np.mean(losses))


def row(name: str, loss: float, base: float, extra: str = "") -> None:
    print(
        f"| {name} | {loss:.4f} | {math.exp(loss):.2f} | {100 * (loss / base - 1):+.2f}% | {extra} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--recovery-steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = lmforge.load(args.model), lmforge.load_tokenizer(args.model)
    batches = windows(args.data, args.seq_len, args.windows)
    base = val_loss(model, batches)
    print(
        f"{args.windows} validation windows of {args.seq_len} tokens; params {model.num_params():,}"
    )
    print("| variant | val loss | ppl | loss change | notes |\n|---|---|---|---|---|")
    row("fp32 (lmforge)", base, base)

    with tempfile.TemporaryDirectory() as tmp:
        for gguf_type in ("f32", "f16", "q8_0", "q4_0"):
            path = export_gguf(model, Path(tmp) / f"m-{gguf_type}.gguf", tokenizer=tokenizer,
                               gguf_type=gguf_type)  # fmt: skip
            size = path.stat().st_size / 2**20
            ours = val_loss(lmforge.load(path), batches)
            theirs = llama_cpp_loss(path, batches, args.seq_len)
            row(f"GGUF {gguf_type}, llama.cpp", theirs, base, f"{size:.2f} MiB")
            row(f"GGUF {gguf_type}, lmforge on the file", ours, base, f"{size:.2f} MiB")

    train = TokenShards(args.data, "train")

    def recovery(m, masks=None):
        opt = torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.0)
        m.train()

        def loop(mm):
            for step in range(args.recovery_steps):
                loss = causal_lm_loss(mm, train.get_batch(8, args.seq_len, seed=1, step=step))
                opt.zero_grad()
                loss.backward()
                opt.step()

        recover(m, loop, masks)
        return val_loss(m, batches)

    for target in (0.3, 0.5, 0.7):
        pruned = copy.deepcopy(model)
        masks = magnitude_prune(pruned, target)
        row(f"magnitude {target:.0%} (global)", val_loss(pruned, batches), base,
            f"sparsity {sparsity(pruned):.3f}")  # fmt: skip
        row(f"  + {args.recovery_steps} recovery steps", recovery(pruned, masks), base)

    calibration = [train.get_batch(4, args.seq_len, seed=2, step=i) for i in range(8)]
    taylor = unit_importance(model, calibration)
    for heads, mlp in ((0.5, 0.0), (0.0, 0.5), (0.5, 0.5)):
        for name, importance in (("Taylor", taylor), ("magnitude", None)):
            pruned, _ = structured_prune(
                model, head_sparsity=heads, mlp_sparsity=mlp, importance=importance
            )
            note = f"params {pruned.num_params():,}"
            row(f"structured heads {heads:.0%} mlp {mlp:.0%} ({name})",
                val_loss(pruned, batches), base, note)  # fmt: skip
            if name == "Taylor":
                row(f"  + {args.recovery_steps} recovery steps", recovery(pruned), base)

    for energy in (0.8, 0.9, 0.95):
        low = copy.deepcopy(model)
        report = low_rank_model(low, energy=energy)
        before = sum(r.params_before for r in report)
        after = sum(r.params_after for r in report)
        ranks = sorted({r.rank for r in report})
        row(f"low-rank energy {energy}", val_loss(low, batches), base,
            f"{len(report)} layers, {before:,} -> {after:,} weights, ranks {ranks[0]}-{ranks[-1]}")  # fmt: skip


if __name__ == "__main__":
    main()
