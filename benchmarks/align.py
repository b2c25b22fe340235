"""Alignment benchmarks (docs/benchmarks.md "Alignment", docs/align.md "Measured").

    python benchmarks/align.py --speed      # demo model: PPO iteration split, DPO step, batching
    python benchmarks/align.py --quality    # tiny SFT model: reward accuracy, EM before/after

--speed times, on the `lmforge run` demo model (random weights; responses never stop early, so
every rollout is max_new_tokens long): a PPO iteration split into rollout / scoring / training,
a DPO step, and one rollout batch three ways (the engine with every prompt in one batch, the
engine one prompt at a time, and greedy decoding without a KV cache).

--quality builds a small model instruction-tuned on imperfect demonstrations of the bundled
comparison task (half the answers wrapped in rambling, half the harmful requests complied with),
then trains a reward model and runs DPO, PPO, GRPO and rejection sampling from it over several
seeds, reporting exact match, refusal rate and KL before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.adapt.dpo import DPOConfig, dpo
from lmforge.adapt.instruct import Example
from lmforge.adapt.optimize import AlignTrainConfig
from lmforge.adapt.ppo import PPOConfig, ppo
from lmforge.adapt.preference import (
    PreferenceDataConfig,
    demonstrations,
    verifiable_pairs,
    verifiable_prompts,
)
from lmforge.adapt.rejection import RejectionConfig, rejection
from lmforge.adapt.reward import RewardConfig, reward_command
from lmforge.adapt.rollout import evaluate
from lmforge.adapt.sft import SFTConfig, greedy_generate, prompt_ids, sft
from lmforge.data.synthetic import generate
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.run import _demo_model
from lmforge.tokenizer import train_bpe
from lmforge.train.trainer import TrainConfig

TASKS = ("arithmetic", "sorting", "comparison")


def task_tokenizer(vocab: int):
    texts = [
        it.question + " " + it.solution for t in TASKS for it in generate(t, 40, split="train")
    ]
    return train_bpe(texts * 3, vocab)


def _timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def speed(out: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    tok = task_tokenizer(4096)
    torch.manual_seed(0)
    model = Transformer(_demo_model()).eval()
    prompts = [p.prompt for p in verifiable_prompts(["comparison"], 16, split="train")]
    new = 32
    ids = [prompt_ids(Example.from_instance(p, ""), tok, "chatml") for p in prompts]
    params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=0, stop_token_ids=(-1,))
    context = max(map(len, ids)) + new

    def engine(batch):
        Engine(
            model, None, max_batch=batch, max_context=context, prefix_cache_tokens=0, eos_id=-1
        ).generate(ids, params)

    no_stop = {-1}
    rollout = {
        "engine, 16 prompts in one batch": _timed(lambda: engine(16)),
        "engine, one prompt at a time": _timed(lambda: engine(1)),
        "greedy without KV cache (batch 16)": _timed(
            lambda: greedy_generate(model, ids, new, no_stop, batch_size=16), repeat=1
        ),
    }
    # One PPO run of 5 iterations (16 prompts x 32 tokens, 4 epochs of minibatch 8), full
    # fine-tuning; the first iteration is a warm-up and is left out.
    ppo_config = PPOConfig(
        model="demo",
        out=str(out / "ppo"),
        method="full",
        tasks=["comparison"],
        prompts_per_task=64,
        max_new_tokens=new,
        eval_items=0,
        kl_samples=0,
        train=AlignTrainConfig(steps=5, batch_size=16, lr=1e-5, warmup_steps=0),
    )
    ppo(ppo_config, model=copy.deepcopy(model), tokenizer=tok)
    rows = [json.loads(x) for x in (out / "ppo/metrics.jsonl").read_text().splitlines()][1:]
    phases = {
        k: statistics.mean(r[k] for r in rows) for k in ("rollout_s", "scoring_s", "training_s")
    }
    dpo_config = DPOConfig(
        model="demo",
        out=str(out / "dpo"),
        method="full",
        eval_items=0,
        eval_harmful=0,
        kl_samples=0,
        data=PreferenceDataConfig(per_task=64, eval_per_task=8),
        train=AlignTrainConfig(steps=11, batch_size=8, lr=1e-5, warmup_steps=0),
    )
    dpo(dpo_config, model=copy.deepcopy(model), tokenizer=tok)
    rows = [json.loads(x) for x in (out / "dpo/metrics.jsonl").read_text().splitlines()]
    dpo_step = statistics.median(b["elapsed"] - a["elapsed"] for a, b in zip(rows, rows[1:]))
    return {
        "threads": threads,
        "rollout_16x32_s": rollout,
        "ppo_iteration_s": phases,
        "dpo_step_8_pairs_s": dpo_step,
    }


# ---- quality ---------------------------------------------------------------------------------
def tiny(vocab: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        d_model=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
        mlp="swiglu",
        position="rope",
        norm="rmsnorm",
    )


def imperfect_sft(out: Path, tok, seed: int, steps: int = 400):
    """A small model SFT'd on comparison answers of which half ramble, plus harmful requests of
    which half are complied with."""
    pairs = verifiable_pairs(
        ["comparison"], 400, split="train", kinds=["concise", "refusal"], levels=(1,)
    )
    out.mkdir(parents=True, exist_ok=True)
    data = out / "demonstrations.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demonstrations(pairs, 0.5)))
    torch.manual_seed(seed)
    model = Transformer(tiny(384))
    config = SFTConfig(
        model="tiny",
        out=str(out / f"sft{seed}"),
        method="full",
        data=[str(data)],
        eval_items=0,
        packing=True,
        train=TrainConfig(
            steps=steps,
            batch_size=16,
            seq_len=128,
            lr=3e-3,
            warmup_steps=10,
            weight_decay=0.0,
            eval_every=0,
            save_every=0,
            seed=seed,
        ),
    )
    sft(config, model=model, tokenizer=tok)
    return model.eval()


EVAL = dict(eval_items=200, eval_harmful=28, kl_samples=64, max_new_tokens=8)


def policy_gradient(out: Path, algo: str, seed: int, common: dict, **kw):
    """A PPO/GRPO run of 20 iterations at a constant lr, as the quality table compares them."""
    train = AlignTrainConfig(
        steps=20, batch_size=16, lr=3e-5, seed=seed, warmup_steps=0, schedule="constant"
    )
    config = PPOConfig(model="sft", out=str(out), algo=algo, **common, **kw, train=train)
    return lambda m, tok: ppo(config, model=m, tokenizer=tok)


def methods(out: Path, seed: int, rm_path: str) -> dict:
    common = dict(method="full", levels=[1], harmful=68, **EVAL)
    data = PreferenceDataConfig(tasks=["comparison"], levels=[1], per_task=400, eval_per_task=50)
    return {
        "DPO (beta 0.5, lr 3e-5, 100 steps)": lambda m, tok: dpo(
            DPOConfig(
                model="sft",
                out=str(out / "dpo"),
                method="full",
                data=data,
                beta=0.5,
                **EVAL,
                train=AlignTrainConfig(steps=100, batch_size=16, lr=3e-5, seed=seed),
            ),
            model=m,
            tokenizer=tok,
        ),
        "DPO + NLL (RPO, nll_coef 1)": lambda m, tok: dpo(
            DPOConfig(
                model="sft",
                out=str(out / "rpo"),
                method="full",
                data=data,
                beta=0.5,
                nll_coef=1.0,
                **EVAL,
                train=AlignTrainConfig(steps=100, batch_size=16, lr=1e-4, seed=seed),
            ),
            model=m,
            tokenizer=tok,
        ),
        "PPO, verifier reward (20 iterations)": policy_gradient(out / "ppo", "ppo", seed, common),
        "PPO, reward model (20 iterations)": policy_gradient(
            out / "ppo_rm", "ppo", seed, common, reward="model", reward_model=rm_path
        ),
        "GRPO, verifier reward (20 iterations, group 4)": policy_gradient(
            out / "grpo", "grpo", seed, common
        ),
        "rejection sampling, best of 4, verifier": lambda m, tok: rejection(
            RejectionConfig(
                model="sft",
                out=str(out / "rs"),
                prompts_per_task=200,
                n=4,
                **common,
                train=TrainConfig(
                    steps=60,
                    batch_size=16,
                    seq_len=64,
                    lr=1e-4,
                    warmup_steps=5,
                    weight_decay=0.0,
                    eval_every=0,
                    save_every=0,
                    resume=False,
                    seed=seed,
                ),
            ),
            model=m,
            tokenizer=tok,
        ),
    }


def quality(out: Path, seeds: list[int]) -> dict:
    torch.set_num_threads(1)
    tok = task_tokenizer(380)
    prompts = verifiable_prompts(["comparison"], 200, split="test", harmful=28, levels=(1,))
    sft_models, sft_scores = {}, []
    for s in seeds:
        sft_models[s] = imperfect_sft(out, tok, s)
        r = evaluate(sft_models[s], tok, "chatml", prompts, max_new_tokens=8)
        sft_scores.append({"exact_match": r["exact_match"], "refusal_rate": r["refusal_rate"]})
    base = sft_models[seeds[0]]
    result = {"sft_seeds": sft_scores, "reward_model": [], "methods": {}}
    for s in seeds:
        rm = reward_command(
            RewardConfig(
                model="sft",
                out=str(out / f"rm{s}"),
                method="full",
                data=PreferenceDataConfig(
                    tasks=["comparison"], levels=[1], per_task=400, eval_per_task=100
                ),
                train=AlignTrainConfig(steps=400, batch_size=16, lr=3e-4, seed=s),
            ),
            model=copy.deepcopy(base),
            tokenizer=tok,
        )
        result["reward_model"].append({"seed": s, **rm["after"], "seconds": rm["train_seconds"]})
    for s in seeds:
        for name, run in methods(out / f"m{s}", s, str(out / f"rm{seeds[0]}" / "model")).items():
            r = run(copy.deepcopy(base), tok)
            row = {
                "seed": s,
                "before": r["before"],
                "after": r["after"],
                "seconds": r.get("train_seconds"),
            }
            result["methods"].setdefault(name, []).append(row)
            print(json.dumps({name: row}), file=sys.stderr, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.speed:
            results["speed"] = speed(Path(tmp) / "speed", args.threads)
        if args.quality:
            results["quality"] = quality(Path(tmp) / "quality", args.seeds)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
