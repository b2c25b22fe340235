"""Prompt + response token sequences for alignment: encoding with the instruction template,
right-padded batches, and per-token log-probabilities of the response under a model.

Every alignment method scores responses the same way: the prompt is rendered exactly as SFT
renders it (so a policy is judged in the format it was tuned in) and only response tokens, the
end-of-turn token included, count (completion-only log-probs; Rafailov et al. 2023 §4)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.adapt.instruct import Example, encode_example
from lmforge.errors import LmforgeError


@dataclass
class Encoded:
    """One prompt + response: token ids and which of them belong to the response."""

    tokens: list[int]
    response: list[bool]


def encode(
    tokenizer, template: str, prompt: str, response: str, max_len: int, *, where: str = ""
) -> Encoded:
    """Tokens of `prompt` -> `response` in `template` (at most max_len + 1); the response keeps
    its end-of-turn token and long prompts lose tokens from the left, as in SFT."""
    enc = encode_example(
        Example.from_instance(prompt, response), tokenizer, template, max_len, where=where or prompt
    )
    return Encoded(enc.tokens, enc.target)


def stop_token(tokenizer, template: str) -> int:
    """The token that ends a response in `template`: <|im_end|> for ChatML-style templates,
    else EOS."""
    im_end = tokenizer.token_to_id("<|im_end|>")
    if template in ("chatml", "chat") and im_end is not None:
        return im_end
    if tokenizer.eos_id is None:
        raise LmforgeError("the tokenizer has no EOS token: responses would never end")
    return tokenizer.eos_id


def from_generation(prompt: list[int], generated: list[int], stopped: bool, stop: int) -> Encoded:
    """A sampled response as an Encoded sequence; a response that stopped keeps its stop token
    (the policy chose to end there, so that choice is scored and trained too)."""
    response = list(generated) + ([stop] if stopped else [])
    return Encoded(list(prompt) + response, [False] * len(prompt) + [True] * len(response))


def pad(encoded: Sequence[Encoded], pad_id: int = 0, device=None) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids and attention_mask (B, T), and response_mask (B, T - 1)
    marking the shifted targets that are response tokens. Causal attention never lets a real
    token see a pad on its right, so no attention mask is needed in the forward pass."""
    T = max(len(e.tokens) for e in encoded)
    B = len(encoded)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    resp = torch.zeros((B, T), dtype=torch.bool)
    for i, e in enumerate(encoded):
        n = len(e.tokens)
        ids[i, :n] = torch.tensor(e.tokens)
        attn[i, :n] = 1
        resp[i, :n] = torch.tensor(e.response)
    batch = {"input_ids": ids, "attention_mask": attn, "response_mask": resp[:, 1:]}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def token_logprobs(
    model: nn.Module, input_ids: torch.Tensor, *, return_hidden: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(x_t | x_<t) for t = 1..T-1: (B, T - 1) in fp32; with return_hidden also the final
    hidden states (B, T, d_model) for a value head."""
    logits, hidden = model(input_ids, return_hidden=True)
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    # gather - logsumexp: the log-softmax without a second (B, T, vocab) tensor.
    picked = logits.gather(-1, targets[..., None]).squeeze(-1)
    out = picked - torch.logsumexp(logits, dim=-1)
    return (out, hidden) if return_hidden else out


def sequence_logprobs(model: nn.Module, batch: dict) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities, one per row (B,)."""
    lp = token_logprobs(model, batch["input_ids"])
    return (lp * batch["response_mask"]).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (advantage whitening); zero outside the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)
