"""`lmforge rejection`: best-of-n / rejection-sampling fine-tuning (seed 002 §5.2.3: instead of
RL, "reuse the best-ranked samples for supervised fine-tuning"; Llama 2, Touvron et al. 2023
§3.2.3). Sample n responses per prompt, score them with the reward model or the verifier, and
run `lmforge sft` on the best response of each prompt."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lmforge.adapt.dpo import print_summary
from lmforge.adapt.instruct import Template, resolve_template
from lmforge.adapt.peft import LoRAConfig
from lmforge.adapt.ppo import PPOConfig, make_scorer
from lmforge.adapt.preference import verifiable_prompts
from lmforge.adapt.rollout import Reference, evaluate, sample
from lmforge.adapt.sft import SFTConfig, sft
from lmforge.config import field_, save_yaml, to_dict
from lmforge.errors import ConfigError, LmforgeError
from lmforge.train.trainer import TrainConfig


def _rejection_train() -> TrainConfig:
    return TrainConfig(
        steps=100,
        batch_size=16,
        seq_len=128,
        lr=1e-4,
        warmup_steps=5,
        weight_decay=0.0,
        eval_every=0,
        save_every=0,
        log_every=10,
        resume=False,
    )


@dataclass
class RejectionConfig:
    """Best-of-n rejection-sampling fine-tuning: SFT on each prompt's best sampled response."""

    model: str = field_("", "policy to improve (usually the SFT model)")
    out: str = field_("runs/rejection", "output directory (the tuned model is out/sft/model)")
    reward: Literal["model", "verifier"] = field_("verifier", "reward model or the verifier")
    reward_model: str = field_("", "reward checkpoint from `lmforge reward` (reward=model)")
    method: Literal["full", "lora"] = field_("lora", "fine-tune all weights, or LoRA")
    lora: LoRAConfig = field_(LoRAConfig(), "LoRA settings")
    template: Template = field_("auto", "instruction template (as in `lmforge sft`)")
    tasks: list[str] = field_(["comparison"], "bundled tasks whose training prompts are used")
    levels: list[int] = field_([1, 2, 3], "difficulty levels of the task prompts")
    prompts_per_task: int = field_(200, "training prompts per task", ge=1)
    harmful: int = field_(0, "listed harmful training requests mixed into the prompts", ge=0)
    n: int = field_(8, "responses sampled per prompt", ge=1)
    temperature: float = field_(1.0, "sampling temperature", gt=0)
    min_reward: float = field_(0.5, "keep a prompt only if its best response scores at least this")
    max_new_tokens: int = field_(16, "longest sampled response", ge=1)
    eval_items: int = field_(50, "held-out task items per task scored before and after", ge=0)
    eval_harmful: int = field_(0, "held-out harmful requests scored (refusal rate)", ge=0)
    kl_samples: int = field_(32, "responses sampled to estimate the final KL", ge=0)
    train: TrainConfig = field_(_rejection_train(), "fine-tuning on the best responses")


def rejection(config: RejectionConfig, *, model: nn.Module | None = None, tokenizer=None) -> dict:
    """Sample, keep the best, fine-tune; writes out/samples.jsonl (every sample and its score),
    out/best.jsonl, out/sft/ (the `lmforge sft` run on the kept responses, its model in
    out/sft/model) and rejection.json. Only finished responses are kept: SFT on a cut-off one
    would teach the model to stop mid-answer."""
    from lmforge.loading import load, load_tokenizer

    c = config
    if model is None:
        if not c.model:
            raise ConfigError("rejection: --model is required (the policy to improve)")
        model, tokenizer = load(c.model), load_tokenizer(c.model)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(c, out / "rejection.yaml")
    torch.manual_seed(c.train.seed)
    template = resolve_template(c.template, tokenizer)
    scorer_config = PPOConfig(reward=c.reward, reward_model=c.reward_model)
    score = make_scorer(scorer_config, tokenizer, template, next(model.parameters()).device)
    prompts = verifiable_prompts(
        c.tasks,
        c.prompts_per_task,
        split="train",
        harmful=c.harmful,
        levels=tuple(c.levels),
        seed=c.train.seed,
    )
    eval_prompts = (
        verifiable_prompts(
            c.tasks, c.eval_items, split="test", harmful=c.eval_harmful, levels=tuple(c.levels)
        )
        if c.eval_items or c.eval_harmful
        else []
    )
    scoring = dict(max_new_tokens=c.max_new_tokens, kl_samples=c.kl_samples, seed=c.train.seed)
    before = evaluate(model, tokenizer, template, eval_prompts, **scoring) if eval_prompts else {}
    if before:
        before["kl"] = 0.0
    # The reference of a full fine-tune is a copy taken now; a LoRA one's is the base itself.
    need_reference = bool(eval_prompts and c.kl_samples)
    reference = Reference(model) if need_reference and c.method == "full" else None

    t0 = time.perf_counter()
    expanded = [p for p in prompts for _ in range(c.n)]
    rollouts = sample(
        model,
        tokenizer,
        template,
        [p.prompt for p in expanded],
        max_new_tokens=c.max_new_tokens,
        temperature=c.temperature,
        seed=c.train.seed,
    )
    sample_s = time.perf_counter() - t0
    scores = score(expanded, rollouts).view(len(prompts), c.n)
    best = scores.argmax(-1)  # the first of equally good responses
    kept = []
    for i, p in enumerate(prompts):
        r = rollouts[i * c.n + int(best[i])]
        if scores[i, best[i]] >= c.min_reward and r.stopped and r.text.strip():
            kept.append(
                {"prompt": p.prompt, "completion": r.text, "reward": float(scores[i, best[i]])}
            )
    if not kept:
        raise LmforgeError(
            f"no prompt had a finished, non-empty response scoring at least min_reward "
            f"{c.min_reward} among {c.n} samples; sample more (--n), allow longer responses "
            "(--max_new_tokens) or lower --min_reward"
        )
    with open(out / "best.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(k, ensure_ascii=False) + "\n" for k in kept)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for p, r, x in zip(expanded, rollouts, scores.flatten().tolist()):
            record = {"prompt": p.prompt, "output": r.text, "finished": r.stopped, "reward": x}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    sc = SFTConfig(
        model=c.model or "the given model",
        data=[str(out / "best.jsonl")],
        out=str(out / "sft"),
        method=c.method,
        lora=c.lora,
        template=template,
        eval_items=0,
        train=c.train,
    )
    tuned = sft(sc, model=model, tokenizer=tokenizer)
    model.eval()
    if need_reference and c.method == "lora":
        reference = Reference(model)
    after = (
        evaluate(model, tokenizer, template, eval_prompts, reference=reference, **scoring)
        if eval_prompts
        else {}
    )
    result = {
        "method": c.method,
        "reward": c.reward,
        "template": template,
        "n": c.n,
        "prompts": len(prompts),
        "kept": len(kept),
        "mean_sample_score": float(scores.mean()),
        "mean_best_score": float(scores.max(-1).values.mean()),
        "sample_seconds": sample_s,
        "steps": tuned["train"]["steps"],
        "train_seconds": tuned["train"]["train_seconds"],
        "before": {k: v for k, v in before.items() if k != "samples"},
        "after": {k: v for k, v in after.items() if k != "samples"},
        "config": to_dict(c),
    }
    (out / "rejection.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(
        f"best of {c.n}: kept {len(kept)} of {len(prompts)} prompts; mean score "
        f"{result['mean_sample_score']:.3f} per sample, {result['mean_best_score']:.3f} best"
    )
    print_summary(f"rejection-sampling fine-tuning ({c.method})", result)
    return result
