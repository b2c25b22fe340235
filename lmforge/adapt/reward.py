"""`lmforge reward`: a reward model (seed 002 §5.2.3) — an lmforge model whose output layer is
replaced by a scalar head read at the last real token — trained on preference pairs with the
Bradley-Terry loss, and its accuracy on held-out pairs.

A reward checkpoint is a model directory (config.yaml, model.safetensors, tokenizer.json) plus
reward_head.safetensors and reward_head.yaml (template, tokenizer fingerprint, accuracy), so the
backbone loads anywhere a model does and `load_reward_model` gets the whole thing back."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.adapt.instruct import Template, resolve_template
from lmforge.adapt.optimize import AlignTrainConfig, Stepper, log_metrics
from lmforge.adapt.peft import LoRAConfig, merge_lora
from lmforge.adapt.preference import Pair, PreferenceDataConfig, load_pairs, ranking_summary
from lmforge.adapt.rollout import prepare_policy
from lmforge.adapt.sequences import Encoded, encode, pad
from lmforge.config import field_, save_yaml, to_dict
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.heads import ScalarHead, last_token_values
from lmforge.train.checkpoint import write_atomically, write_model_files
from lmforge.train.trainer import resolve_device

HEAD_FILE, META_FILE = "reward_head.safetensors", "reward_head.yaml"


class RewardModel(nn.Module):
    """r(x, y): the backbone's final hidden state at the last real token, through a scalar head
    (InstructGPT, Ouyang et al. 2022 §3.5: the SFT model with its unembedding layer removed)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        w = backbone.embed.weight
        self.head = ScalarHead(backbone.config.d_model).to(device=w.device, dtype=w.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids, hidden_only=True)
        return last_token_values(self.head(hidden), attention_mask)


def reward_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: torch.Tensor | float = 0.0,
    center_coef: float = 0.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood -log sigmoid(r_c - r_r - m), weighted mean.

    margin m: Llama 2 (Touvron et al. 2023 §3.2.2) subtracts a margin that grows with how much
    better the chosen response was rated. center_coef * (r_c + r_r)^2: the reward-centring term
    of Eisenstein et al. 2023, which pins the rewards' mean near 0 (the BT loss sees only
    differences, so the level would otherwise drift)."""
    per = -F.logsigmoid(chosen - rejected - margin)
    if center_coef:
        per = per + center_coef * (chosen + rejected) ** 2
    if weight is None:
        return per.mean()
    return (per * weight).sum() / weight.sum()


def encode_pairs(
    pairs: Sequence[Pair], tokenizer, template: str, max_len: int
) -> list[tuple[Encoded, Encoded]]:
    return [
        (
            encode(tokenizer, template, p.prompt, p.chosen, max_len, where=f"pair {i} (chosen)"),
            encode(
                tokenizer, template, p.prompt, p.rejected, max_len, where=f"pair {i} (rejected)"
            ),
        )
        for i, p in enumerate(pairs)
    ]


def pair_batch(encoded: Sequence[tuple[Encoded, Encoded]], pad_id: int, device) -> dict:
    """The chosen responses in rows [0, B) and the rejected ones in [B, 2B): one forward pass."""
    return pad([c for c, _ in encoded] + [r for _, r in encoded], pad_id, device)


@torch.no_grad()
def rewards_of(
    model: RewardModel, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 32
) -> torch.Tensor:
    """r(x, y) of encoded sequences, in batches."""
    device = model.head.proj.weight.device
    out = []
    for i in range(0, len(encoded), batch_size):
        b = pad(encoded[i : i + batch_size], pad_id, device)
        out.append(model(b["input_ids"], b["attention_mask"]).float())
    return torch.cat(out) if out else torch.zeros(0)


def pair_accuracy(
    model: RewardModel,
    pairs: Sequence[Pair],
    encoded: Sequence[tuple[Encoded, Encoded]],
    pad_id: int,
) -> dict:
    """Share of held-out pairs whose chosen response gets the higher reward (ties count half),
    overall and by pair kind, and the mean reward margin."""
    if not pairs:
        return {"accuracy": None}
    rc = rewards_of(model, [c for c, _ in encoded], pad_id)
    rr = rewards_of(model, [r for _, r in encoded], pad_id)
    right = (rc > rr).float() + 0.5 * (rc == rr).float()
    by_kind: dict[str, list[float]] = {}
    for p, x in zip(pairs, right.tolist()):
        by_kind.setdefault(p.kind, []).append(x)
    return {
        "accuracy": float(right.mean()),
        "accuracy_by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()},
        "margin": float((rc - rr).mean()),
        "mean_reward": float(torch.cat([rc, rr]).mean()),
    }


# ---- saving and loading ----------------------------------------------------------------------
def save_reward_model(model: RewardModel, path: str | Path, tokenizer, meta: dict) -> Path:
    """Write the reward checkpoint directory atomically (LoRA updates merged into the weights)."""
    if getattr(model.backbone, "peft", None) is not None and model.backbone.peft.active:
        merge_lora(model.backbone)
    meta = {"format": "lmforge-reward/1", "tokenizer_sha256": tokenizer.sha256, **meta}

    def write(tmp: Path) -> None:
        write_model_files(tmp, model.backbone, tokenizer=tokenizer)
        head = {k: v.detach().contiguous() for k, v in model.head.state_dict().items()}
        save_file(head, str(tmp / HEAD_FILE))
        (tmp / META_FILE).write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")

    return write_atomically(path, write)


def load_reward_model(path: str | Path, device: str = "cpu") -> tuple[RewardModel, object, dict]:
    """(reward model in eval mode, its tokenizer, its reward_head.yaml metadata)."""
    from lmforge.loading import load, load_tokenizer

    path = Path(path)
    if not (path / META_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a reward model: no {META_FILE} (train one with `lmforge reward`)"
        )
    meta = yaml.safe_load((path / META_FILE).read_text(encoding="utf-8"))
    model = RewardModel(load(path, device=device))
    try:
        model.head.load_state_dict(load_file(str(path / HEAD_FILE), device=str(device)))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read the reward head in {path}: {e}") from None
    return model.eval(), load_tokenizer(path), meta


def check_tokenizer(policy_tokenizer, reward_tokenizer, reward_path: str) -> None:
    """A reward model reads the policy's tokens only if both use the same tokenizer."""
    if policy_tokenizer.sha256 != reward_tokenizer.sha256:
        raise ConfigError(
            f"the reward model {reward_path} uses another tokenizer (vocabulary "
            f"{reward_tokenizer.vocab_size}, sha256 {reward_tokenizer.sha256[:12]}) than the "
            f"policy (vocabulary {policy_tokenizer.vocab_size}, sha256 "
            f"{policy_tokenizer.sha256[:12]}); train the reward model from the policy's "
            "checkpoint so both read the same tokens"
        )


# ---- the command -----------------------------------------------------------------------------
def _reward_train() -> AlignTrainConfig:
    return AlignTrainConfig(steps=150, batch_size=16, lr=3e-4)


@dataclass
class RewardConfig:
    """Train a reward model on preference pairs (Bradley-Terry) and report held-out accuracy."""

    model: str = field_("", "model the reward model starts from (usually the SFT model)")
    out: str = field_("runs/reward", "output directory (the reward checkpoint is out/model)")
    data: PreferenceDataConfig = field_(PreferenceDataConfig(), "preference pairs")
    method: Literal["full", "lora"] = field_("full", "train all weights, or LoRA (merged on save)")
    lora: LoRAConfig = field_(LoRAConfig(), "LoRA settings")
    template: Template = field_("auto", "instruction template (as in `lmforge sft`)")
    max_len: int = field_(256, "longest prompt + response in tokens", ge=2)
    margin: float = field_(0.0, "margin added to every pair's own margin (Llama 2)", ge=0)
    center_coef: float = field_(0.0, "weight of the reward-centring term (r_c + r_r)^2", ge=0)
    train: AlignTrainConfig = field_(_reward_train(), "optimisation")


def reward_command(config: RewardConfig, *, model: nn.Module | None = None, tokenizer=None) -> dict:
    """Train and save a reward model; writes out/model, metrics.jsonl and reward.json."""
    from lmforge.loading import load, load_tokenizer

    c, t = config, config.train
    if model is None:
        if not c.model:
            raise ConfigError("reward: --model is required (the checkpoint to start from)")
        model, tokenizer = load(c.model), load_tokenizer(c.model)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(c, out / "reward.yaml")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    device = resolve_device(t.device)
    torch.manual_seed(t.seed)
    template = resolve_template(c.template, tokenizer)
    max_len = min(c.max_len, model.config.max_seq_len - 1)
    train_pairs, eval_pairs = load_pairs(c.data, t.seed)
    train_enc = encode_pairs(train_pairs, tokenizer, template, max_len)
    eval_enc = encode_pairs(eval_pairs, tokenizer, template, max_len)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    model = model.to(device)
    prepare_policy(model, c.method, c.lora)
    rm = RewardModel(model)
    before = pair_accuracy(rm.eval(), eval_pairs, eval_enc, pad_id)
    rm.train()
    stepper = Stepper(rm, t, t.steps)
    rng = random.Random(t.seed)
    start = time.perf_counter()
    for step in range(1, t.steps + 1):
        idx = [rng.randrange(len(train_enc)) for _ in range(t.batch_size)]
        batch = pair_batch([train_enc[i] for i in idx], pad_id, device)
        r = rm(batch["input_ids"], batch["attention_mask"])
        rc, rr = r[: len(idx)], r[len(idx) :]
        margin = torch.tensor([train_pairs[i].margin + c.margin for i in idx], device=device)
        weight = torch.tensor([train_pairs[i].weight for i in idx], device=device)
        loss = reward_loss(rc, rr, margin=margin, center_coef=c.center_coef, weight=weight)
        norm = stepper(loss)
        log_metrics(
            out,
            {
                "step": step,
                "loss": loss.item(),
                "grad_norm": norm,
                "accuracy": float((rc > rr).float().mean()),
                "elapsed": time.perf_counter() - start,
            },
        )
        if 0 < t.time_limit_s <= time.perf_counter() - start:
            break
    train_s = time.perf_counter() - start
    after = pair_accuracy(rm.eval(), eval_pairs, eval_enc, pad_id)
    meta = {
        "template": template,
        "max_len": max_len,
        "base_model": c.model,
        "eval_accuracy": after["accuracy"],
        "eval_pairs": len(eval_pairs),
    }
    save_reward_model(rm, out / "model", tokenizer, meta)
    result = {
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "steps": step,
        "train_seconds": train_s,
        "before": before,
        "after": after,
        "rankings": ranking_summary(train_pairs + eval_pairs),
        "config": to_dict(c),
    }
    (out / "reward.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    acc = after["accuracy"]
    print(
        f"reward model: {len(train_pairs)} training pairs, {step} steps ({train_s:.0f}s); "
        f"held-out accuracy {'n/a' if acc is None else f'{acc:.3f}'} on {len(eval_pairs)} pairs"
        + "".join(f"; {k} {v:.3f}" for k, v in after.get("accuracy_by_kind", {}).items())
    )
    for row in result["rankings"][:10]:
        print(f"  {row['source']}: Bradley-Terry {row['bradley_terry']:+.2f}, Elo {row['elo']:.0f}")
    return result
