"""LoRA training step: lmforge vs full fine-tuning vs transformers + PEFT on the same model and
data (SmolLM2-135M, fp32, CPU), then a quality check: every PEFT method fine-tuned for the same
steps on the rule-generated set, exact match on held-out items before and after.

    .venv/bin/python benchmarks/peft_step.py [--steps 6] [--quality-steps 40]

Each speed configuration runs in its own process so its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

BATCH, SEQ, R, TARGETS = 4, 128, 8, ["q_proj", "k_proj", "v_proj", "o_proj"]


def _batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))


def _time_steps(step, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def one(kind: str, steps: int, hf_dir: str) -> dict:
    import torch.nn.functional as F

    from lmforge.adapt.peft import LoRAConfig, PeftConfig, add_adapter
    from lmforge.loading import load

    data = _batch(49152)
    x, y = data[:, :-1], data[:, 1:]
    if kind.startswith("lmforge"):
        model = load(hf_dir).train()
        if kind.startswith("lmforge-lora"):
            add_adapter(model, PeftConfig(method="lora", lora=LoRAConfig(r=R, targets=TARGETS)))
        forward = model
    else:
        import peft
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        model = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=16, target_modules=TARGETS))
        model.train()

        def forward(ids):
            return model(input_ids=ids).logits

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def loss_of(x, y):
        logits = forward(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    # What `--train.compile=true` does in the Trainer: compile model + loss (first step excluded).
    loss_fn = torch.compile(loss_of) if kind.endswith("-compiled") else loss_of

    def step():
        loss_fn(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = _time_steps(step, steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "step_s": seconds, "peak_rss_mib": peak,
            "trainable": sum(p.numel() for p in params)}  # fmt: skip


def quality(steps: int) -> list[dict]:
    from lmforge.adapt.sft import SFTConfig, sft
    from lmforge.loading import load, load_tokenizer

    rows = []
    tok = load_tokenizer("smollm2")
    for method in ["full", "lora", "adapter", "prefix", "prompt"]:
        model = load("smollm2")
        cfg = SFTConfig(
            model="smollm2", method=method, out=tempfile.mkdtemp(), synthetic_per_task=100,
            synthetic_tasks=["comparison", "unit_conversion"], languages=["en"], eval_items=10,
            max_new_tokens=40, packing=method != "prompt",
        )  # fmt: skip
        cfg.lora.targets, cfg.lora.r = ["all-linear"], 8
        cfg.prompt.init_text = "Answer the question step by step, then give the final answer."
        cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = steps, 4, 128
        cfg.train.lr = 2e-5 if method == "full" else (3e-2 if method == "prompt" else 1e-3)
        result = sft(cfg, model=model, tokenizer=tok)
        rows.append({k: result[k] for k in ("method", "trainable_parameters",
                     "exact_match_before", "exact_match_after", "eval_items")}
                    | {"train_seconds": result["train"]["train_seconds"]})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--quality-steps", type=int, default=40)
    ap.add_argument("--one", default="")
    ap.add_argument("--hf-dir", default="")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.hf_dir)))
        return
    from lmforge.interop.hf import export_hf
    from lmforge.loading import load

    hf_dir = tempfile.mkdtemp()
    export_hf(load("smollm2"), hf_dir)
    results = {}
    for kind in ["lmforge-lora", "lmforge-lora-compiled", "peft-lora", "lmforge-full"]:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            kind,
            "--steps",
            str(args.steps),
            "--hf-dir",
            hf_dir,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[kind] = json.loads(out.strip().splitlines()[-1])
        print(results[kind], flush=True)
    base = results["lmforge-lora"]["step_s"]
    print(f"\nSmolLM2-135M fp32, batch {BATCH}x{SEQ}, LoRA r={R} on {TARGETS}, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    print("| configuration | step (s) | vs lmforge LoRA | peak RSS (MiB) | trainable |")
    print("|---|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {kind} | {r['step_s']:.3f} | {r['step_s'] / base:.2f}x | "
              f"{r['peak_rss_mib']:.0f} | {r['trainable']:,} |")  # fmt: skip
    if args.quality_steps:
        rows = quality(args.quality_steps)
        print(f"\nquality: {args.quality_steps} steps each, batch 4x128, held-out exact match")
        print("| method | trainable | before | after | train s |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['trainable_parameters']:,} | {r['exact_match_before']:.3f} "
                  f"| {r['exact_match_after']:.3f} | {r['train_seconds']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
