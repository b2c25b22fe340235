"""QLoRA vs LoRA on the fp32 base: memory and step time on SmolLM2-135M, then accuracy after the
same fine-tuning on the rule-generated set (as benchmarks/peft_step.py's quality table).

    .venv/bin/python benchmarks/qlora.py [--steps 3] [--rounds 2] [--quality-steps 30]

Both configurations train LoRA r=8 on every linear layer of the blocks (as the QLoRA paper
does), batch 4x128 of fixed random tokens, AdamW, lmforge's causal_lm_loss. Each runs in its
own process, loading its base from disk: the fp32 checkpoint for LoRA, the NF4 checkpoint
(written once by `save_quantized`) for QLoRA, so neither process ever holds the other's
weights. Memory: resident set after loading and adding the adapter, and the peak during the
training steps alone (the kernel's peak-RSS counter is reset after setup: /proc/self/clear_refs,
"5"). The configurations take turns for --rounds rounds so load from other jobs on the shared
machine falls on both alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Scratch folders (HF exports, run outputs of hundreds of MB) live under one temporary folder
# that is removed when the script exits.
_SCRATCH = tempfile.TemporaryDirectory(prefix="lmforge-bench-")


def scratch() -> str:
    return tempfile.mkdtemp(dir=_SCRATCH.name)


BATCH, SEQ, R = 4, 128, 8


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one(kind: str, steps: int, bases: str) -> dict:
    from lmforge.adapt.peft import LoRAConfig, PeftConfig, add_adapter
    from lmforge.compress.qlora import prepare_qlora
    from lmforge.compress.quantized_model import load_quantized
    from lmforge.loading import load
    from lmforge.train.objectives import causal_lm_loss

    lora = LoRAConfig(r=R, targets=["all-linear"])
    if kind == "qlora":
        model = load_quantized(Path(bases) / "nf4").train()
        prepare_qlora(model, lora)
    else:
        model = load(Path(bases) / "fp32").train()
        add_adapter(model, PeftConfig(method="lora", lora=lora))
    data = torch.randint(0, model.config.vocab_size, (BATCH, SEQ + 1),
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    x, y = data[:, :-1], data[:, 1:]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gc.collect()
    after_setup = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    times, losses = [], []
    for i in range(steps + 1):  # the first step warms up and is not timed
        t = time.perf_counter()
        loss = causal_lm_loss(model, (x, y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return {"kind": kind, "step_s": times, "rss_after_setup_mib": after_setup,
            "peak_rss_training_mib": _rss_mib("VmHWM"), "losses": losses,
            "trainable": sum(p.numel() for p in params)}  # fmt: skip


def prepare_bases(directory: Path) -> dict:
    """fp32 and NF4 checkpoints of SmolLM2-135M; returns the blocks' linear weight bytes."""
    from lmforge.compress.qlora import quantize_base_nf4
    from lmforge.compress.quantized_model import save_quantized
    from lmforge.loading import load
    from lmforge.train.checkpoint import save_model

    model = load("smollm2")
    save_model(model, directory / "fp32")
    fp32 = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("blocks.")
               and p.dim() == 2)  # fmt: skip
    quantize_base_nf4(model)
    save_quantized(model, directory / "nf4")
    nf4 = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
              if n.startswith("blocks."))  # fmt: skip
    return {"fp32_linear_mb": fp32 / 1e6, "nf4_linear_mb": nf4 / 1e6}


def speed(rounds: int, steps: int) -> None:
    bases = Path(scratch())
    sizes = prepare_bases(bases)
    print(f"blocks' linear weights: fp32 {sizes['fp32_linear_mb']:.0f} MB, "
          f"NF4 {sizes['nf4_linear_mb']:.0f} MB", flush=True)  # fmt: skip
    results: dict[str, dict] = {}
    for _ in range(rounds):
        for kind in ("lora", "qlora"):
            cmd = [sys.executable, __file__, "--one", kind, "--steps", str(steps),
                   "--bases", str(bases)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(r, flush=True)
            if kind in results:
                results[kind]["step_s"] += r["step_s"]
                for k in ("rss_after_setup_mib", "peak_rss_training_mib"):
                    results[kind][k] = max(results[kind][k], r[k])
            else:
                results[kind] = r
    print(f"\nSmolLM2-135M, batch {BATCH}x{SEQ}, LoRA r={R} on all linear layers, torch threads "
          f"{torch.get_num_threads()}; {rounds} rounds x {steps} steps")  # fmt: skip
    print("| base | median step (s) | fastest step (s) | RSS after load (MiB) "
          "| peak RSS training (MiB) | trainable |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {'NF4 (QLoRA)' if kind == 'qlora' else 'fp32 (LoRA)'} "
              f"| {statistics.median(r['step_s']):.3f} | {min(r['step_s']):.3f} "
              f"| {r['rss_after_setup_mib']:.0f} | {r['peak_rss_training_mib']:.0f} "
              f"| {r['trainable']:,} |")  # fmt: skip
    lo, q = results["lora"], results["qlora"]
    median = statistics.median(q["step_s"]) / statistics.median(lo["step_s"])
    print(
        f"QLoRA / LoRA: step {median:.2f}x (median), {min(q['step_s']) / min(lo['step_s']):.2f}x "
        f"(fastest); RSS after load {q['rss_after_setup_mib'] / lo['rss_after_setup_mib']:.2f}x, "
        f"peak RSS training {q['peak_rss_training_mib'] / lo['peak_rss_training_mib']:.2f}x"
    )


def quality(steps: int, kinds: list[str]) -> None:
    """The same SFT run (peft_step.py's quality settings, LoRA r=8 on all linear layers) over
    the fp32 base and over the NF4 base; exact match before (the base alone) and after."""
    from lmforge.adapt.sft import SFTConfig, sft
    from lmforge.compress.qlora import quantize_base_nf4
    from lmforge.loading import load, load_tokenizer

    tok = load_tokenizer("smollm2")
    rows = []
    for kind in kinds:
        model = load("smollm2")
        if kind == "qlora":
            quantize_base_nf4(model)
        cfg = SFTConfig(
            model="smollm2", method="lora", out=scratch(), synthetic_per_task=100,
            synthetic_tasks=["comparison", "unit_conversion"], languages=["en"], eval_items=10,
            max_new_tokens=40,
        )  # fmt: skip
        cfg.lora.targets, cfg.lora.r = ["all-linear"], R
        cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = steps, 4, 128
        cfg.train.lr = 1e-3
        result = sft(cfg, model=model, tokenizer=tok)
        rows.append((kind, result))
    n = rows[0][1]["eval_items"]
    print(f"\nquality: {steps} steps each, batch 4x128, held-out exact match (n={n})")
    print("| base | before (base alone) | after | train s |")
    print("|---|---|---|---|")
    for kind, r in rows:
        print(f"| {'NF4 (QLoRA)' if kind == 'qlora' else 'fp32 (LoRA)'} "
              f"| {r['exact_match_before']:.2f} | {r['exact_match_after']:.2f} "
              f"| {r['train']['train_seconds']:.0f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quality-steps", type=int, default=30, help="0 skips the quality run")
    ap.add_argument("--quality-bases", default="lora,qlora", help="quality run: lora, qlora")
    ap.add_argument("--one", default="")
    ap.add_argument("--bases", default="")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.bases)))
        return
    if args.rounds:
        speed(args.rounds, args.steps)
    if args.quality_steps:
        quality(args.quality_steps, args.quality_bases.split(","))


if __name__ == "__main__":
    main()
