"""`lmforge dpo`: Direct Preference Optimization (Rafailov et al. 2023) and its IPO variant
(Azar et al. 2023): the policy learns from preference pairs directly, with the reference model's
log-probabilities standing in for the reward model and the KL penalty of RLHF.

The reference log-probabilities are computed once before training (`reference=precomputed`: no
reference model is kept while training) or on the fly. A LoRA policy's reference is its own base
with the adapters switched off, never a second copy of the weights."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.adapt.instruct import Template, resolve_template
from lmforge.adapt.optimize import AlignTrainConfig, Stepper, log_metrics
from lmforge.adapt.peft import LoRAConfig, save_adapter
from lmforge.adapt.preference import PreferenceDataConfig, load_pairs, verifiable_prompts
from lmforge.adapt.reward import encode_pairs, pair_batch
from lmforge.adapt.rollout import Reference, evaluate, prepare_policy
from lmforge.adapt.sequences import token_logprobs
from lmforge.config import field_, save_yaml, to_dict
from lmforge.errors import ConfigError
from lmforge.train.checkpoint import save_model
from lmforge.train.trainer import resolve_device


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards beta * log(pi / pi_ref) of chosen and rejected,
    from summed response log-probabilities (B,).

    sigmoid (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h), h the chosen-minus-rejected
    difference of log-ratios; label_smoothing eps assumes a share eps of the labels are flipped
    (conservative DPO): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    ipo (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2, a squared loss that does not push
    h to infinity on deterministic preferences. At initialisation (pi = pi_ref) h = 0 and the
    sigmoid loss is ln 2."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"unknown DPO loss {loss_type!r}; choose sigmoid or ipo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _dpo_train() -> AlignTrainConfig:
    return AlignTrainConfig(steps=100, batch_size=8, lr=1e-4)


@dataclass
class DPOConfig:
    """Align a model on preference pairs with DPO (or IPO), full or LoRA."""

    model: str = field_("", "policy to align (usually the SFT model); also the reference")
    out: str = field_("runs/dpo", "output directory (the aligned model is out/model)")
    data: PreferenceDataConfig = field_(PreferenceDataConfig(), "preference pairs")
    method: Literal["full", "lora"] = field_("lora", "train all weights, or LoRA")
    lora: LoRAConfig = field_(LoRAConfig(), "LoRA settings")
    template: Template = field_("auto", "instruction template (as in `lmforge sft`)")
    max_len: int = field_(256, "longest prompt + response in tokens", ge=2)
    beta: float = field_(0.1, "strength of the implicit KL constraint (IPO: tau)", gt=0)
    loss: Literal["sigmoid", "ipo"] = field_("sigmoid", "DPO's sigmoid loss or IPO's squared loss")
    label_smoothing: float = field_(
        0.0, "assumed share of flipped labels (sigmoid only)", ge=0, le=0.5
    )
    nll_coef: float = field_(
        0.0, "weight of the chosen responses' per-token NLL added to the loss (RPO)", ge=0
    )
    reference: Literal["precomputed", "online"] = field_(
        "precomputed", "reference log-probs computed once before training, or every step"
    )
    eval_items: int = field_(50, "held-out task items per task scored before and after", ge=0)
    eval_harmful: int = field_(8, "held-out harmful requests scored (refusal rate)", ge=0)
    kl_samples: int = field_(32, "responses sampled to estimate the KL to the reference", ge=0)
    max_new_tokens: int = field_(16, "longest generated answer when scoring", ge=1)
    train: AlignTrainConfig = field_(_dpo_train(), "optimisation")

    def validate(self) -> None:
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError("label_smoothing applies to the sigmoid loss only, not to ipo")


@torch.no_grad()
def _reference_logprobs(model, encoded, pad_id, device, batch_size=16):
    """(chosen, rejected) summed response log-probs of every pair under `model`."""
    chosen, rejected = [], []
    for i in range(0, len(encoded), batch_size):
        b = pair_batch(encoded[i : i + batch_size], pad_id, device)
        lp = (token_logprobs(model, b["input_ids"]) * b["response_mask"]).sum(-1)
        n = len(encoded[i : i + batch_size])
        chosen.append(lp[:n])
        rejected.append(lp[n:])
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)


def dpo(config: DPOConfig, *, model: nn.Module | None = None, tokenizer=None) -> dict:
    """Run DPO; writes out/model (+ adapter files for LoRA), metrics.jsonl and dpo.json with
    held-out preference accuracy, verifier reward, exact match, refusal rate and KL."""
    from lmforge.loading import load, load_tokenizer

    c, t = config, config.train
    if model is None:
        if not c.model:
            raise ConfigError("dpo: --model is required (the policy to align)")
        model, tokenizer = load(c.model), load_tokenizer(c.model)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(c, out / "dpo.yaml")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    device = resolve_device(t.device)
    torch.manual_seed(t.seed)
    model = model.to(device)
    template = resolve_template(c.template, tokenizer)
    max_len = min(c.max_len, model.config.max_seq_len - 1)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train_pairs, eval_pairs = load_pairs(c.data, t.seed)
    train_enc = encode_pairs(train_pairs, tokenizer, template, max_len)
    eval_enc = encode_pairs(eval_pairs, tokenizer, template, max_len)
    prompts = (
        verifiable_prompts(
            c.data.tasks,
            c.eval_items,
            split="test",
            harmful=c.eval_harmful,
            levels=tuple(c.data.levels),
        )
        if c.eval_items or c.eval_harmful
        else []
    )

    ref_train = ref_eval = None
    if c.reference == "precomputed":  # before any update the policy is its own reference
        model.eval()
        ref_train = _reference_logprobs(model, train_enc, pad_id, device)
        ref_eval = _reference_logprobs(model, eval_enc, pad_id, device)
    prepare_policy(model, c.method, c.lora)
    # Kept only where needed: every step (online) or for the KL after training.
    reference = Reference(model) if c.reference == "online" or (prompts and c.kl_samples) else None
    scoring = dict(max_new_tokens=c.max_new_tokens, kl_samples=c.kl_samples, seed=t.seed)
    before = evaluate(model, tokenizer, template, prompts, **scoring) if prompts else {}
    if before:
        before["kl"] = 0.0  # the policy is the reference

    def pair_logprobs(m, idx, encoded, precomputed):
        b = pair_batch([encoded[i] for i in idx], pad_id, device)
        lp = (token_logprobs(m, b["input_ids"]) * b["response_mask"]).sum(-1)
        if precomputed is not None:
            ref = (precomputed[0][idx], precomputed[1][idx])
        else:
            r = (reference.token_logprobs(b["input_ids"]) * b["response_mask"]).sum(-1)
            ref = (r[: len(idx)], r[len(idx) :])
        return lp[: len(idx)], lp[len(idx) :], *ref

    loss_args = dict(beta=c.beta, loss_type=c.loss, label_smoothing=c.label_smoothing)
    model.train()
    stepper = Stepper(model, t, t.steps)
    rng = random.Random(t.seed)
    start = time.perf_counter()
    for step in range(1, t.steps + 1):
        idx = torch.tensor([rng.randrange(len(train_enc)) for _ in range(t.batch_size)])
        logprobs = pair_logprobs(model, idx, train_enc, ref_train)
        losses, rc, rr = dpo_loss(*logprobs, **loss_args)
        loss = losses.mean()
        if c.nll_coef:
            # RPO (Pang et al. 2024; Llama 3 uses 0.2): DPO may lower the chosen responses'
            # probability along with the rejected ones'; their NLL per token keeps them likely.
            tokens = torch.tensor([sum(train_enc[i][0].response) for i in idx], device=device)
            loss = loss + c.nll_coef * (-logprobs[0] / tokens).mean()
        norm = stepper(loss)
        log_metrics(
            out,
            {
                "step": step,
                "loss": loss.item(),
                "grad_norm": norm,
                "reward_accuracy": float((rc > rr).float().mean()),
                "reward_margin": float((rc - rr).mean()),
                "elapsed": time.perf_counter() - start,
            },
        )
        if 0 < t.time_limit_s <= time.perf_counter() - start:
            break
    train_s = time.perf_counter() - start
    model.eval()
    held = {}
    if eval_pairs:
        with torch.no_grad():
            parts = [
                dpo_loss(
                    *pair_logprobs(
                        model, torch.arange(i, min(i + 16, len(eval_enc))), eval_enc, ref_eval
                    ),
                    **loss_args,
                )
                for i in range(0, len(eval_enc), 16)
            ]
        losses, rc, rr = (torch.cat(x) for x in zip(*parts))
        held = {
            "loss": float(losses.mean()),
            "reward_accuracy": float((rc > rr).float().mean()),
            "reward_margin": float((rc - rr).mean()),
        }
    after = (
        evaluate(model, tokenizer, template, prompts, reference=reference, **scoring)
        if prompts
        else {}
    )
    save_model(model, out / "model", tokenizer=tokenizer)
    if c.method == "lora":
        save_adapter(model, out / "model", base_name=c.model)
    result = {
        "method": c.method,
        "loss": c.loss,
        "beta": c.beta,
        "template": template,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "steps": step,
        "train_seconds": train_s,
        "held_out_pairs": held,
        "before": {k: v for k, v in before.items() if k != "samples"},
        "after": {k: v for k, v in after.items() if k != "samples"},
        "config": to_dict(c),
    }
    (out / "dpo.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if after:
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in after["samples"])
    print_summary(f"dpo ({c.method}, {c.loss}, beta {c.beta})", result)
    return result


def print_summary(title: str, result: dict) -> None:
    """One line of training facts, then before -> after of what was scored."""
    print(f"{title}: {result['steps']} steps in {result['train_seconds']:.0f}s")
    held = result.get("held_out_pairs") or {}
    if held:
        print(
            f"  held-out pairs: accuracy {held['reward_accuracy']:.3f}, "
            f"margin {held['reward_margin']:.3f}, loss {held['loss']:.4f}"
        )
    b, a = result["before"], result["after"]
    for key in ("reward", "exact_match", "refusal_rate", "kl"):
        if a.get(key) is not None:
            was = "" if b.get(key) is None else f"{b[key]:.3f} -> "
            print(f"  {key}: {was}{a[key]:.3f}")
