"""Objective comparison: the same small Transformer trained on the same token windows with each
pre-training objective, then scored zero-shot on a held-out multiple-choice continuation task.

The task (built from the validation split of the default corpus, as in benchmarks/extrapolation.py):
a 32-token context and four 8-token continuations, the true one and three drawn from elsewhere in
the split; accuracy = the true one has the highest log-likelihood (chance 25%). Each model is
scored in its own pre-training format, with no fine-tuning:
  causal  p(continuation | context), causal attention
  prefix  the same with the context as a bidirectional prefix
  span    T5 format: inputs = context + <extra_id_0> + EOS, targets = <extra_id_0> + continuation
  ul2     [S] + context as the prefix (UL2's mode switching to its sequential denoiser)
  mlm     pseudo-log-likelihood (Salazar et al. 2020): each continuation token masked in turn
Decoders are one prefix-decoder architecture (the causal objective simply never passes a
prefix); the MLM model is an encoder of the same width and depth. Every model reads
steps x batch windows of seq_len tokens.

    python benchmarks/objectives.py [--steps 300] [--items 200] [--out runs/bench_extrapolation]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lmforge.data.shards import TokenShards
from lmforge.model import ModelConfig, Transformer
from lmforge.train.objectives import ObjectiveOptions, objective_batches, objective_loss
from lmforge.train.optim import cosine_schedule

CONTEXT, CONTINUATION, CHOICES = 32, 8, 4


def make_task(val: TokenShards, items: int, seed: int = 0) -> list[tuple[np.ndarray, list]]:
    """(context, [true continuation, 3 distractors]) items from the validation split."""
    rng = np.random.default_rng(seed)
    stream = np.asarray(val.shards[0]).astype(np.int64)
    n = CONTEXT + CONTINUATION
    out = []
    for _ in range(items):
        start = int(rng.integers(0, len(stream) - n))
        context, true = stream[start : start + CONTEXT], stream[start + CONTEXT : start + n]
        others = [stream[s : s + CONTINUATION] for s in rng.integers(0, len(stream) - n, 3)]
        out.append((context, [true, *others]))
    return out


def model_config(objective: str, vocab: int, seq: int) -> ModelConfig:
    common = dict(
        vocab_size=vocab,
        d_model=128,
        n_layers=2,
        n_heads=4,
        max_seq_len=seq + 64,
        mlp="gelu",
        norm="layernorm",
    )
    if objective == "mlm":
        return ModelConfig(arch="encoder", type_vocab_size=2, nsp_head=True, **common)
    return ModelConfig(arch="prefix", **common)


def train(objective: str, data: TokenShards, args) -> tuple[Transformer, object]:
    torch.manual_seed(0)
    # Room for the reserved special tokens above the data's vocabulary (docs/objectives.md).
    vocab = data.vocab_size + 128
    config = model_config(objective, vocab, args.seq)
    model = Transformer(config)
    source = objective_batches(objective, config, data, options=ObjectiveOptions(sentinels=20))
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
        loss = objective_loss(model, source.get_batch(args.batch, args.seq, seed=0, step=step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), source.specials


def _sum_logprob(logits: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor) -> float:
    logp = logits.float().log_softmax(-1)
    return float(logp[positions, targets].sum())


@torch.no_grad()
def score(objective: str, model: Transformer, specials, context, choice) -> float:
    """Log-likelihood of `choice` after `context` in the objective's own format."""
    if objective == "mlm":
        row = np.concatenate([[specials.cls], context, choice, [specials.sep]])
        at = np.arange(1 + len(context), 1 + len(context) + len(choice))
        ids = torch.as_tensor(row).repeat(len(at), 1)
        ids[torch.arange(len(at)), torch.as_tensor(at)] = specials.mask
        logits = model(ids, token_type_ids=torch.zeros_like(ids))
        return float(
            logits.float().log_softmax(-1)[torch.arange(len(at)), torch.as_tensor(at), choice].sum()
        )
    if objective == "span":  # inputs end with EOS; the targets open with the sentinel
        s0 = specials.sentinels[0]
        prefix, bidirectional = np.concatenate([context, [s0, specials.eos, s0]]), len(context) + 2
    elif objective == "ul2":
        prefix = np.concatenate([[specials.modes["S"]], context])
        bidirectional = len(prefix)
    else:
        prefix, bidirectional = context, len(context)
    row = torch.as_tensor(np.concatenate([prefix, choice]))[None]
    kwargs = {} if objective == "causal" else {"prefix_len": torch.tensor([bidirectional])}
    logits = model(row[:, :-1], **kwargs)[0]
    positions = torch.arange(len(prefix) - 1, row.shape[1] - 1)
    return _sum_logprob(logits, torch.as_tensor(choice), positions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--out", default="runs/bench_extrapolation", help="shards from there")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = TokenShards(f"{args.out}/shards", "train")
    task = make_task(TokenShards(f"{args.out}/shards", "validation"), args.items)
    print(f"{args.steps} steps x {args.batch} x {args.seq} tokens; {len(task)} items, chance 25%")
    rows = []
    for objective in ("causal", "prefix", "span", "ul2", "mlm"):
        start = time.perf_counter()
        model, specials = train(objective, data, args)
        correct = [
            int(np.argmax([score(objective, model, specials, ctx, c) for c in choices]) == 0)
            for ctx, choices in task
        ]
        acc, stderr = np.mean(correct), np.std(correct) / np.sqrt(len(correct))
        rows.append((objective, acc, stderr))
        print(
            f"{objective}: acc {acc:.3f} +- {stderr:.3f} ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    print("\n| objective | model | zero-shot accuracy | stderr |\n|---|---|---:|---:|")
    for objective, acc, stderr in rows:
        arch = "encoder" if objective == "mlm" else "prefix decoder"
        print(f"| {objective} | {arch} | {acc:.3f} | {stderr:.3f} |")


if __name__ == "__main__":
    main()
