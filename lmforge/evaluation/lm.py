"""The three request types an evaluation makes of a model, batched and batch-size independent.

- loglikelihood(context, continuation) -> (sum of log p(continuation tokens), is greedy)
- loglikelihood_rolling(text) -> per-window log-likelihoods summed over the whole text
- generate_until(prompt, stop strings) -> text

Tokenization follows lm-evaluation-harness 0.4 (`api/model.py: _encode_pair`, `HFLM.tok_encode`):
trailing spaces of the context move into the continuation, context+continuation is encoded as one
string and split where the context's own encoding ends, and the tokenizer's default special tokens
are used unless the text already starts with BOS. Requests are sorted longest first for batching
and put back in order afterwards, so results do not depend on the batch size or padding side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer


class ContextTooLong(LmforgeError):
    """A request does not fit the model's window and truncation was turned off."""


@dataclass
class TokenRequest:
    """One scoring request in tokens: score `continuation` after `context`. `tag` names the task
    and item for messages."""

    context: list[int]
    continuation: list[int]
    tag: str = ""


@dataclass
class LoglikResult:
    logprob: float
    is_greedy: bool
    n_tokens: int
    truncated: int = 0  # context tokens dropped from the left to fit the window


@dataclass
class Overflow:
    """What to do with a request longer than the model's window: "truncate" drops context from
    the left (as lm-eval does) and records a warning; "error" raises."""

    policy: Literal["truncate", "error"] = "truncate"
    warnings: list[str] = field(default_factory=list)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """lm-eval's tok_encode: the tokenizer's default special tokens (a Llama tokenizer adds BOS),
    none when the text already starts with the BOS string."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return tokenizer.backend.encode(text, add_special_tokens=add_special).ids


def prefix_token_id(tokenizer: Tokenizer) -> int:
    """The token an empty context becomes: BOS, else EOS (lm-eval's HFLM.prefix_token_id)."""
    token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if token is None:
        raise LmforgeError("scoring an empty context needs a tokenizer with a BOS or EOS token")
    return token


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """(context ids, continuation ids) split the way lm-eval splits them."""
    if context == "":
        cont = tokenizer.backend.encode(continuation, add_special_tokens=False).ids
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def _forward_batch(
    model: Transformer, rows: list[list[int]], padding_side: str, pad_id: int
) -> torch.Tensor:
    """Float32 log-softmax over (B, T, vocab) for rows padded to one length; left padding passes
    an attention mask so positions still start at 0 for every row."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(longest - len(r), longest) if padding_side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    if padding_side == "left":
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=positions)
    else:
        logits = model(ids)  # causal: real tokens never attend to the padding after them
    return logits.float().log_softmax(-1)


@torch.inference_mode()
def loglikelihood_tokens(
    model: Transformer,
    requests: Sequence[TokenRequest],
    *,
    batch_size: int = 16,
    padding_side: Literal["right", "left"] = "right",
    pad_id: int = 0,
    overflow: Overflow | None = None,
    max_length: int | None = None,
) -> list[LoglikResult]:
    """Score token requests in batches; results come back in the order of `requests`."""
    overflow = overflow or Overflow()
    max_length = max_length or model.config.max_seq_len
    inputs: list[tuple[list[int], int, int]] = []  # (model input, continuation length, dropped)
    for req in requests:
        if not req.continuation:
            raise LmforgeError(f"{req.tag}: the continuation is empty after tokenization")
        whole = req.context + req.continuation
        # lm-eval: the input is (context + continuation)[-(max_length + 1):][:-1].
        dropped = max(0, len(whole) - (max_length + 1))
        if dropped:
            if len(req.continuation) > max_length:
                raise ContextTooLong(
                    f"{req.tag}: the continuation alone ({len(req.continuation)} tokens) exceeds "
                    f"the model's window of {max_length} tokens"
                )
            message = (
                f"{req.tag}: context + continuation is {len(whole) - 1} tokens, over the model's "
                f"window of {max_length}; {dropped} context tokens dropped from the left"
            )
            if overflow.policy == "error":
                raise ContextTooLong(message + " (set overflow=truncate to allow this)")
            overflow.warnings.append(message)
        inputs.append((whole[dropped:][:-1], len(req.continuation), dropped))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    results: list[LoglikResult | None] = [None] * len(inputs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [inputs[i][0] for i in chunk]
        logprobs = _forward_batch(model, rows, padding_side, pad_id)
        longest = logprobs.shape[1]
        for b, i in enumerate(chunk):
            row, n_cont, dropped = inputs[i]
            target = requests[i].continuation
            end = longest if padding_side == "left" else len(row)
            scores = logprobs[b, end - n_cont : end]
            target_t = torch.tensor(target, device=scores.device)
            logprob = scores.gather(-1, target_t[:, None]).sum().item()
            greedy = bool((scores.argmax(-1) == target_t).all())
            results[i] = LoglikResult(logprob, greedy, n_cont, dropped)
    return results  # type: ignore[return-value]


def rolling_windows(
    tokens: list[int], prefix_token: int, window: int, stride: int
) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows covering `tokens`: lm-eval's
    get_rolling_token_windows + make_disjoint_window with context_len = window - stride + 1, so
    stride = window (the default) gives lm-eval's windows exactly and a smaller stride gives each
    window window - stride tokens of extra context."""
    if not 1 <= stride <= window:
        raise LmforgeError(
            f"rolling perplexity: need 1 <= stride <= window, got {stride}, {window}"
        )
    if not tokens:
        return []
    first = min(window, len(tokens))
    out = [([prefix_token] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, stride)
        end = predicted + n
        out.append((tokens[max(0, end - window - 1) : end - 1], tokens[end - n : end]))
        predicted += n
    # make_disjoint_window: keep only the context part that is not also predicted.
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in out]


@dataclass
class RollingResult:
    logprob: float
    n_tokens: int
    n_words: int
    n_bytes: int

    @property
    def token_perplexity(self) -> float:
        return math.exp(-self.logprob / self.n_tokens)


def loglikelihood_rolling(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    padding_side: Literal["right", "left"] = "right",
    tags: Sequence[str] | None = None,
) -> list[RollingResult]:
    """Log-likelihood of each whole text, scored in windows of `window` tokens (default: the
    model's max_seq_len) advancing by `stride` (default: window), all windows batched together."""
    import re

    window = window or model.config.max_seq_len
    stride = stride or window
    requests, owner = [], []
    for i, text in enumerate(texts):
        tag = tags[i] if tags else f"text {i}"
        for ctx, cont in rolling_windows(
            encode(tokenizer, text), prefix_token_id(tokenizer), window, stride
        ):
            requests.append(TokenRequest(ctx, cont, tag))
            owner.append(i)
    scored = loglikelihood_tokens(
        model,
        requests,
        batch_size=batch_size,
        padding_side=padding_side,
        pad_id=_pad_id(tokenizer),
        max_length=window,
    )
    sums = [0.0] * len(texts)
    counts = [0] * len(texts)
    for i, r in zip(owner, scored, strict=True):
        sums[i] += r.logprob
        counts[i] += r.n_tokens
    # lm-eval's wikitext counts words as re.split(r"\s+", text) pieces and bytes as UTF-8.
    return [
        RollingResult(sums[i], counts[i], len(re.split(r"\s+", t)), len(t.encode("utf-8")))
        for i, t in enumerate(texts)
    ]


def _pad_id(tokenizer: Tokenizer) -> int:
    for candidate in (tokenizer.pad_id, tokenizer.eos_id, 0):
        if candidate is not None:
            return candidate
    return 0


def loglikelihood(
    model: Transformer,
    tokenizer: Tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    padding_side: Literal["right", "left"] = "right",
    overflow: Overflow | None = None,
    tags: Sequence[str] | None = None,
) -> list[LoglikResult]:
    """Score (context, continuation) text pairs, tokenized as lm-eval does."""
    requests = []
    for i, (context, continuation) in enumerate(pairs):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        requests.append(TokenRequest(ctx, cont, tags[i] if tags else f"request {i}"))
    return loglikelihood_tokens(
        model,
        requests,
        batch_size=batch_size,
        padding_side=padding_side,
        pad_id=_pad_id(tokenizer),
        overflow=overflow,
    )


def generate_until(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    until: Sequence[str] = (),
    max_gen_toks: int = 256,
    temperature: float = 0.0,
    seed: int | None = None,
    batch_size: int = 16,
    overflow: Overflow | None = None,
    tags: Sequence[str] | None = None,
) -> list[str]:
    """Generate a continuation of each prompt, cut before the first stop string. The one place
    evaluation calls the generator, so it can move to the batched engine without other changes.
    Prompts longer than max_seq_len - max_gen_toks are cut from the left (lm-eval's
    left_truncate_len) or rejected, per `overflow`."""
    from lmforge.infer.generate import SamplingParams, generate

    overflow = overflow or Overflow()
    limit = model.config.max_seq_len - max_gen_toks
    if limit < 1:
        raise LmforgeError(
            f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the model's window of "
            f"{model.config.max_seq_len} tokens"
        )
    encoded = []
    for i, prompt in enumerate(prompts):
        ids = encode(tokenizer, prompt) or [prefix_token_id(tokenizer)]
        if len(ids) > limit:
            tag = tags[i] if tags else f"prompt {i}"
            message = (
                f"{tag}: prompt is {len(ids)} tokens, over the {limit} left after reserving "
                f"{max_gen_toks} for generation; {len(ids) - limit} tokens dropped from the left"
            )
            if overflow.policy == "error":
                raise ContextTooLong(message + " (set overflow=truncate to allow this)")
            overflow.warnings.append(message)
            ids = ids[-limit:]
        encoded.append(ids)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        # generate() seeds prompt j of a call with seed + j; offsetting by the chunk start gives
        # every prompt the same seed whatever the batch size.
        params = SamplingParams(
            max_new_tokens=max_gen_toks,
            temperature=temperature,
            stop_strings=tuple(until),
            seed=None if seed is None else seed + start,
        )
        outs = generate(model, [encoded[i] for i in chunk], params, tokenizer=tokenizer)
        for i, out in zip(chunk, outs, strict=True):
            texts[i] = out.text or ""
    return texts
