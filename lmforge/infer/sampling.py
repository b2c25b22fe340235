"""Choosing the next token: temperature, top-k, top-p (nucleus) and the CTRL repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SamplingParams:
    """How each new token is chosen and when generation stops."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 turns top-k off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 turns it off
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        rules = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 is off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("stop_strings", all(self.stop_strings), "must not contain an empty string"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")


def apply_repetition_penalty(
    logits: torch.Tensor, seen_ids_mask: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): for tokens seen so far (bool mask like logits), divide positive
    logits by `penalty` and multiply negative ones, so seen tokens get less likely either way."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen_ids_mask, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (k = 0 keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most probable tokens
    whose probabilities sum to >= p; the most probable token always stays."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = F.pad(probs.cumsum(dim=-1)[..., :-1], (1, 0))
    drop = torch.empty_like(mass_before, dtype=torch.bool).scatter_(-1, order, mass_before >= p)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token id per row of (B, vocab) logits: the argmax when temperature is 0, else a sample
    after temperature scaling, then top-k, then top-p (the order transformers uses)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_k_filter(logits / params.temperature, params.top_k)
    probs = top_p_filter(logits, params.top_p).float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
