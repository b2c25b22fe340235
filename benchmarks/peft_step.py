"""LoRA training step: lmforge vs full fine-tuning vs transformers + PEFT on the same model and
data (SmolLM2-135M, fp32, CPU), then a quality check: every PEFT method fine-tuned for the same
steps on the rule-generated set, exact match on held-out items before and after.

    .venv/bin/python benchmarks/peft_step.py [--steps 3] [--rounds 2] [--pairs 5]
        [--quality-steps 30] [--kinds lmforge-lora,peft-lora,...] [--methods prefix,...]

Each speed configuration runs in its own process so its peak memory (max RSS) is its own. The
configurations take turns for `--rounds` rounds, so load from other jobs on a shared machine
falls on all of them alike; the table gives the median and the fastest of all timed steps.
`--pairs N` then times lmforge and PEFT LoRA steps alternating in one process (the ratio per
pair of steps is what to trust when other jobs load the machine).
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

# Scratch folders (HF exports, run outputs of hundreds of MB) live under one temporary folder
# that is removed when the script exits.
_SCRATCH = tempfile.TemporaryDirectory(prefix="lmforge-bench-")


def scratch() -> str:
    return tempfile.mkdtemp(dir=_SCRATCH.name)


BATCH, SEQ, R, TARGETS = 4, 128, 8, ["q_proj", "k_proj", "v_proj", "o_proj"]


def _batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))


def _time_steps(step, steps: int) -> list[float]:
    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def _setup(kind: str, hf_dir: str):
    """One configuration's training step (a closure) and its trainable parameters."""
    import torch.nn.functional as F

    from lmforge.adapt.peft import LoRAConfig, PeftConfig, add_adapter
    from lmforge.loading import load

    data = _batch(49152)
    x, y = data[:, :-1], data[:, 1:]
    if kind.startswith("lmforge"):
        model = load(hf_dir).train()
        if kind.startswith("lmforge-lora"):
            add_adapter(model, PeftConfig(method="lora", lora=LoRAConfig(r=R, targets=TARGETS)))
    else:
        import peft
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        model = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=16, target_modules=TARGETS))
        model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    if kind.startswith("lmforge"):
        from lmforge.train.objectives import causal_lm_loss

        def loss_of(x, y):  # lmforge's objective: the chunked output layer + cross-entropy
            return causal_lm_loss(model, (x, y))
    else:

        def loss_of(x, y):  # what transformers' own loss does: fp32 logits, cross-entropy
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

    # What `--train.compile=true` does in the Trainer: compile model + loss (first step excluded).
    loss_fn = torch.compile(loss_of) if kind.endswith("-compiled") else loss_of

    def step():
        loss_fn(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, params


def one(kind: str, steps: int, hf_dir: str) -> dict:
    step, params = _setup(kind, hf_dir)
    times = _time_steps(step, steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "step_s": times, "peak_rss_mib": peak,
            "trainable": sum(p.numel() for p in params)}  # fmt: skip


def paired(pairs: int) -> None:
    """lmforge LoRA and PEFT LoRA in one process, steps alternating: each pair of steps sees
    about the same load from other jobs. Besides wall time, the CPU time each step consumed
    (time.process_time) is reported: on a machine shared with other jobs it moves far less
    with their load than the wall time does (memory is measured per process by the rounds)."""
    from lmforge.interop.hf import export_hf
    from lmforge.loading import load

    hf_dir = scratch()
    export_hf(load("smollm2"), hf_dir)
    steps = {"lmforge": _setup("lmforge-lora", hf_dir)[0], "PEFT": _setup("peft-lora", hf_dir)[0]}
    for step in steps.values():
        step()  # warm-up
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(pairs):
        # Alternate which goes first, so neither always follows the other.
        for name in list(steps)[:: 1 if i % 2 == 0 else -1]:
            t, c = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
        print(f"pair {i}: " + ", ".join(f"{k} {wall[k][-1]:.2f} s wall / {cpu[k][-1]:.2f} s CPU"
              for k in steps), flush=True)  # fmt: skip
    for label, t in (("wall", wall), ("CPU", cpu)):
        ratios = [p / o for p, o in zip(t["PEFT"], t["lmforge"])]
        print(f"{label}: lmforge median {statistics.median(t['lmforge']):.3f} s, PEFT median "
              f"{statistics.median(t['PEFT']):.3f} s; PEFT / lmforge per pair: median "
              f"{statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x")  # fmt: skip


def quality(steps: int, methods: list[str]) -> list[dict]:
    from lmforge.adapt.sft import SFTConfig, sft
    from lmforge.loading import load, load_tokenizer

    rows = []
    tok = load_tokenizer("smollm2")
    for method in methods:
        model = load("smollm2")
        cfg = SFTConfig(
            model="smollm2", method=method, out=scratch(), synthetic_per_task=100,
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


def speed(kinds: list[str], rounds: int, steps: int) -> None:
    from lmforge.interop.hf import export_hf
    from lmforge.loading import load

    hf_dir = scratch()
    export_hf(load("smollm2"), hf_dir)
    results: dict[str, dict] = {}
    for _ in range(rounds):
        for kind in kinds:
            cmd = [sys.executable, __file__, "--one", kind, "--steps", str(steps),
                   "--hf-dir", hf_dir]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(r, flush=True)
            if kind in results:
                results[kind]["step_s"] += r["step_s"]
                results[kind]["peak_rss_mib"] = max(
                    results[kind]["peak_rss_mib"], r["peak_rss_mib"]
                )
            else:
                results[kind] = r
    print(f"\nSmolLM2-135M fp32, batch {BATCH}x{SEQ}, LoRA r={R} on {TARGETS}, torch threads "
          f"{torch.get_num_threads()}; {rounds} rounds x {steps} steps")  # fmt: skip
    ref = results.get("peft-lora")
    print("| configuration | median step (s) | fastest step (s) | PEFT / this (median, fastest) "
          "| peak RSS (MiB) | trainable |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for kind, r in results.items():
        med, low = statistics.median(r["step_s"]), min(r["step_s"])
        ratio = (f"{statistics.median(ref['step_s']) / med:.2f}x, {min(ref['step_s']) / low:.2f}x"
                 if ref else "-")  # fmt: skip
        print(f"| {kind} | {med:.3f} | {low:.3f} | {ratio} | {r['peak_rss_mib']:.0f} | "
              f"{r['trainable']:,} |")  # fmt: skip


KINDS = ["lmforge-lora", "lmforge-lora-compiled", "peft-lora", "lmforge-full"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2, help="turns each configuration takes")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--quality-steps", type=int, default=30)
    ap.add_argument("--methods", default="full,lora,adapter,prefix,prompt", help="quality table")
    ap.add_argument("--pairs", type=int, default=0, help="paired lmforge/PEFT steps, one process")
    ap.add_argument("--one", default="")
    ap.add_argument("--hf-dir", default="")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.hf_dir)))
        return
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        ap.error(f"unknown --kinds {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    if kinds and args.rounds:
        speed(kinds, args.rounds, args.steps)
    if args.pairs:
        paired(args.pairs)
    if args.quality_steps:
        rows = quality(args.quality_steps, args.methods.split(","))
        print(f"\nquality: {args.quality_steps} steps each, batch 4x128, held-out exact match")
        print("| method | trainable | before | after | train s |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['trainable_parameters']:,} | {r['exact_match_before']:.3f} "
                  f"| {r['exact_match_after']:.3f} | {r['train_seconds']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
