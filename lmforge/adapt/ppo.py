"""`lmforge ppo`: RLHF with PPO (seed 002 §5.2.3 "Key Steps"; Ziegler et al. 2019; InstructGPT,
Ouyang et al. 2022), and GRPO (Shao et al. 2024) as the option without a value model.

One iteration: sample responses to a batch of prompts through the batched generation engine
(rollout), score them with the reward model or the verifier and read the policy, reference and
value estimates of every response token (scoring), then run several epochs of clipped updates
on the batch (training). The reference is frozen: for a LoRA policy it is the base with the
adapters off, so there is no second copy of the weights.

PPO: per-token reward -kl_coef * KL_t plus the score at the last token, GAE advantages
(whitened), clipped policy and value losses, fixed or adaptive KL coefficient.
GRPO: n responses per prompt, advantage = (score - group mean) / group std for every token of
a response, no value model, and the KL to the reference (k3) as a loss term instead."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lmforge.adapt.dpo import print_summary
from lmforge.adapt.instruct import Template, resolve_template
from lmforge.adapt.optimize import AlignTrainConfig, Stepper, log_metrics
from lmforge.adapt.peft import LoRAConfig, save_adapter
from lmforge.adapt.preference import verifiable_prompts
from lmforge.adapt.rollout import Reference, evaluate, prepare_policy, sample
from lmforge.adapt.sequences import masked_mean, masked_whiten, pad, token_logprobs
from lmforge.config import field_, save_yaml, to_dict
from lmforge.errors import ConfigError, LmforgeError
from lmforge.model.heads import ScalarHead
from lmforge.train.checkpoint import save_model
from lmforge.train.trainer import resolve_device


# ---- the formulas ----------------------------------------------------------------------------
def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: Literal["k1", "k3"]
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs (Schulman 2020,
    "Approximating KL divergence"): k1 = log pi - log pi_ref (unbiased, can be negative);
    k3 = (r - 1) - log r with r = pi_ref / pi (unbiased, never negative, lower variance)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_r = ref_logp - logp
        return torch.expm1(log_r) - log_r
    raise ConfigError(f"unknown KL estimator {estimator!r}; choose k1 or k3")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over each row's masked (response)
    positions: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with
    V = 0 after the last response token. Returns (advantages, returns = A + V), zero outside."""
    mask = mask.to(values.dtype)
    T = rewards.shape[1]
    adv = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * mask[:, t]
        # Outside the response (prompt, padding) nothing carries over to earlier positions.
        next_value = values[:, t] * mask[:, t]
        next_adv = adv[:, t]
    return adv, (adv + values) * mask


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss, mean over masked tokens:
    max(-A r, -A clip(r, 1 - eps, 1 + eps)) with r = pi / pi_old; and the clipped share."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> torch.Tensor:
    """Clipped value loss (as in OpenAI's PPO2 baselines and Ziegler et al. 2019's code):
    0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2), mean over masked tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def group_advantages(scores: torch.Tensor, group: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024 §4.1.2): each score minus its group's mean, over the group's
    standard deviation; rows are [prompt 0 x group, prompt 1 x group, ...]."""
    s = scores.view(-1, group)
    std = s.std(dim=1, keepdim=True) if group > 1 else torch.ones_like(s)
    return ((s - s.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019 §2.2): beta <- beta (1 + K_beta
    e), e = clip(KL / target - 1, -0.2, 0.2), K_beta = steps / horizon, so KL tracks the target."""

    def __init__(self, coef: float, target: float | None, horizon: int) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, steps: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.coef *= 1 + error * steps / self.horizon


# ---- the command -----------------------------------------------------------------------------
def _ppo_train() -> AlignTrainConfig:
    return AlignTrainConfig(steps=30, batch_size=16, lr=1e-4, warmup_steps=0, schedule="constant")


@dataclass
class PPOConfig:
    """RLHF with PPO (policy, frozen reference, reward model, value head) or GRPO."""

    model: str = field_("", "policy to align (usually the SFT model); also the reference")
    out: str = field_("runs/ppo", "output directory (the aligned model is out/model)")
    algo: Literal["ppo", "grpo"] = field_("ppo", "PPO with a value head, or GRPO's group baseline")
    reward: Literal["model", "verifier"] = field_(
        "verifier", "score responses with a reward model (reward_model) or the tasks' verifier"
    )
    reward_model: str = field_("", "reward checkpoint from `lmforge reward` (reward=model)")
    method: Literal["full", "lora"] = field_("lora", "train all weights, or LoRA")
    lora: LoRAConfig = field_(LoRAConfig(), "LoRA settings")
    template: Template = field_("auto", "instruction template (as in `lmforge sft`)")
    tasks: list[str] = field_(["comparison"], "bundled tasks whose training prompts are used")
    levels: list[int] = field_([1, 2, 3], "difficulty levels of the task prompts")
    prompts_per_task: int = field_(400, "training prompts per task", ge=1)
    harmful: int = field_(0, "listed harmful training requests mixed into the prompts", ge=0)
    max_new_tokens: int = field_(16, "longest sampled response", ge=1)
    temperature: float = field_(1.0, "sampling temperature of the rollouts", gt=0)
    group: int = field_(4, "GRPO: responses per prompt", ge=2)
    ppo_epochs: int = field_(4, "passes over each rollout batch", ge=1)
    minibatch: int = field_(8, "responses per gradient step", ge=1)
    clip: float = field_(0.2, "policy ratio clip epsilon", gt=0)
    value_clip: float = field_(0.2, "value clip epsilon", gt=0)
    value_coef: float = field_(0.1, "weight of the value loss", ge=0)
    gamma: float = field_(1.0, "discount", ge=0, le=1)
    lam: float = field_(0.95, "GAE lambda", ge=0, le=1)
    whiten: bool = field_(True, "whiten advantages over each rollout batch (PPO)")
    kl_coef: float = field_(0.05, "KL coefficient (initial value if adaptive)", ge=0)
    kl_estimator: Literal["k1", "k3"] = field_("k1", "per-token KL estimator of the PPO penalty")
    kl_target: float = field_(
        0.0, "adaptive KL: target KL per response (0: fixed coefficient)", ge=0
    )
    kl_horizon: int = field_(10000, "adaptive KL horizon in responses", ge=1)
    kl_stop: float = field_(
        20.0,
        "stop when the mean KL per response exceeds this (nats; the last good checkpoint is kept)",
        gt=0,
    )
    save_every: int = field_(5, "checkpoint the policy every N iterations", ge=1)
    eval_items: int = field_(50, "held-out task items per task scored before and after", ge=0)
    eval_harmful: int = field_(0, "held-out harmful requests scored (refusal rate)", ge=0)
    kl_samples: int = field_(32, "responses sampled to estimate the final KL", ge=0)
    train: AlignTrainConfig = field_(_ppo_train(), "optimisation (steps = iterations)")


def _save_policy(model: nn.Module, path: Path, tokenizer, method: str, name: str) -> None:
    save_model(model, path, tokenizer=tokenizer)
    if method == "lora":
        save_adapter(model, path, base_name=name)


def ppo(config: PPOConfig, *, model: nn.Module | None = None, tokenizer=None) -> dict:
    """Run PPO or GRPO; writes out/model, out/checkpoint (the last good policy), metrics.jsonl
    (score, KL, losses and the rollout / scoring / training seconds of every iteration) and
    ppo.json (verifier reward, exact match, refusal rate and KL before and after)."""
    from lmforge.loading import load, load_tokenizer

    c, t = config, config.train
    if model is None:
        if not c.model:
            raise ConfigError("ppo: --model is required (the policy to align)")
        model, tokenizer = load(c.model), load_tokenizer(c.model)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(c, out / "ppo.yaml")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    device = resolve_device(t.device)
    torch.manual_seed(t.seed)
    model = model.to(device)
    template = resolve_template(c.template, tokenizer)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    score = make_scorer(c, tokenizer, template, device)
    train_prompts = verifiable_prompts(
        c.tasks,
        c.prompts_per_task,
        split="train",
        harmful=c.harmful,
        levels=tuple(c.levels),
        seed=t.seed,
    )
    eval_prompts = (
        verifiable_prompts(
            c.tasks, c.eval_items, split="test", harmful=c.eval_harmful, levels=tuple(c.levels)
        )
        if c.eval_items or c.eval_harmful
        else []
    )

    prepare_policy(model, c.method, c.lora)
    reference = Reference(model)
    w = model.embed.weight
    value_head = ScalarHead(model.config.d_model).to(device=w.device, dtype=w.dtype)
    trained = nn.ModuleDict({"policy": model} | ({"value": value_head} if c.algo == "ppo" else {}))
    scoring = dict(max_new_tokens=c.max_new_tokens, kl_samples=c.kl_samples, seed=t.seed)
    before = evaluate(model, tokenizer, template, eval_prompts, **scoring) if eval_prompts else {}
    if before:
        before["kl"] = 0.0
    per_batch = t.batch_size * (c.group if c.algo == "grpo" else 1)
    updates = c.ppo_epochs * math.ceil(per_batch / c.minibatch)
    stepper = Stepper(trained, t, t.steps * updates)
    kl_ctl = KLController(c.kl_coef, c.kl_target or None, c.kl_horizon)
    rng = random.Random(t.seed)
    last_good, start = 0, time.perf_counter()
    for it in range(1, t.steps + 1):
        # -- rollout: one engine call, every prompt's responses decoded as one batch
        t0 = time.perf_counter()
        chosen = [train_prompts[rng.randrange(len(train_prompts))] for _ in range(t.batch_size)]
        if c.algo == "grpo":
            chosen = [p for p in chosen for _ in range(c.group)]
        rollouts = sample(
            model,
            tokenizer,
            template,
            [p.prompt for p in chosen],
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            seed=t.seed * 1_000_003 + it * len(chosen),
        )
        # -- scoring: reward, old log-probs, reference log-probs, values
        t1 = time.perf_counter()
        scores = score(chosen, rollouts).to(device)
        batch = pad([r.encoded for r in rollouts], pad_id, device)
        mask = batch["response_mask"].float()
        with torch.no_grad():
            model.eval()
            old_logp, hidden = token_logprobs(model, batch["input_ids"], return_hidden=True)
            ref_logp = reference.token_logprobs(batch["input_ids"])
            old_values = value_head(hidden[:, :-1]).float()
        kl_tokens = kl_estimate(old_logp, ref_logp, c.kl_estimator) * mask
        kl = float((kl_tokens.sum(-1)).mean())
        if not math.isfinite(kl) or kl > c.kl_stop:
            raise LmforgeError(
                f"the KL to the reference exploded at step {it}: {kl:.3g} nats per response > "
                f"kl_stop {c.kl_stop:g}; stopped. The last good policy (step {last_good}) is in "
                f"{out / 'checkpoint'}" + ("" if last_good else " (none was saved yet)")
            )
        if c.algo == "ppo":
            rewards = -kl_ctl.coef * kl_tokens
            last = mask.cumsum(-1).argmax(-1)  # the last response token of each row
            rewards[torch.arange(len(last)), last] += scores
            advantages, returns = gae(rewards, old_values, mask, c.gamma, c.lam)
            if c.whiten:
                advantages = masked_whiten(advantages, mask)
        else:
            advantages = group_advantages(scores, c.group)[:, None] * mask
            returns = None
        # -- training: ppo_epochs passes of clipped updates over shuffled minibatches
        t2 = time.perf_counter()
        model.train()
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clipfrac": []}
        for _ in range(c.ppo_epochs):
            order = torch.randperm(len(rollouts))
            for i in range(0, len(order), c.minibatch):
                mb = order[i : i + c.minibatch]
                m = mask[mb]
                logp, hidden = token_logprobs(model, batch["input_ids"][mb], return_hidden=True)
                pg, clipfrac = policy_loss(logp, old_logp[mb], advantages[mb], m, c.clip)
                loss = pg
                if c.algo == "ppo":
                    values = value_head(hidden[:, :-1]).float()
                    vf = value_loss(values, old_values[mb], returns[mb], m, c.value_clip)
                    loss = loss + c.value_coef * vf
                    stats["value_loss"].append(vf.item())
                else:
                    # Shao et al. 2024 eq. 3: the KL (k3) is in the loss, not in the reward.
                    loss = loss + c.kl_coef * masked_mean(kl_estimate(logp, ref_logp[mb], "k3"), m)
                stepper(loss)
                stats["policy_loss"].append(pg.item())
                stats["clipfrac"].append(clipfrac.item())
        kl_ctl.update(kl, len(rollouts))
        t3 = time.perf_counter()
        record = {
            "step": it,
            "score": float(scores.mean()),
            "kl": kl,
            "kl_coef": kl_ctl.coef,
            "response_tokens": float(mask.sum(-1).mean()),
            "rollout_s": t1 - t0,
            "scoring_s": t2 - t1,
            "training_s": t3 - t2,
            **{k: sum(v) / len(v) for k, v in stats.items() if v},
        }
        log_metrics(out, record)
        if it % c.save_every == 0:
            _save_policy(model, out / "checkpoint", tokenizer, c.method, c.model)
            last_good = it
        if 0 < t.time_limit_s <= time.perf_counter() - start:
            break
    train_s = time.perf_counter() - start
    model.eval()
    after = (
        evaluate(model, tokenizer, template, eval_prompts, reference=reference, **scoring)
        if eval_prompts
        else {}
    )
    _save_policy(model, out / "model", tokenizer, c.method, c.model)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    phases = {k: sum(m[k] for m in metrics) for k in ("rollout_s", "scoring_s", "training_s")}
    result = {
        "algo": c.algo,
        "method": c.method,
        "reward": c.reward,
        "template": template,
        "steps": it,
        "train_seconds": train_s,
        "seconds": phases,
        "final_score": metrics[-1]["score"],
        "final_kl": metrics[-1]["kl"],
        "before": {k: v for k, v in before.items() if k != "samples"},
        "after": {k: v for k, v in after.items() if k != "samples"},
        "config": to_dict(c),
    }
    (out / "ppo.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if after:
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in after["samples"])
    print_summary(f"{c.algo} ({c.method}, reward: {c.reward})", result)
    total = sum(phases.values()) or 1.0
    print(
        "  time: "
        + ", ".join(f"{k[:-2]} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in phases.items())
    )
    return result


def make_scorer(c: PPOConfig, tokenizer, template: str, device):
    """score(prompts, rollouts) -> (B,) rewards: the verifier's, or the reward model's on the
    responses re-encoded in the reward model's own template."""
    if c.reward == "verifier":
        return lambda prompts, rollouts: torch.tensor(
            [p.reward(r.text) for p, r in zip(prompts, rollouts)]
        )
    if not c.reward_model:
        raise ConfigError("reward=model needs --reward_model (a checkpoint from `lmforge reward`)")
    from lmforge.adapt.reward import check_tokenizer, load_reward_model, rewards_of
    from lmforge.adapt.sequences import encode

    rm, rm_tokenizer, meta = load_reward_model(c.reward_model, device=device)
    check_tokenizer(tokenizer, rm_tokenizer, c.reward_model)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def score(prompts, rollouts):
        enc = [
            encode(tokenizer, meta["template"], p.prompt, r.text, meta["max_len"])
            for p, r in zip(prompts, rollouts)
        ]
        return rewards_of(rm, enc, pad_id)

    return score
