"""One-call generation: `generate` (a batch of prompts) and `stream` (text pieces of one prompt),
both thin wrappers over `Engine`. The sampling and sequence pieces are re-exported here."""

from __future__ import annotations

from collections.abc import Iterator

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from lmforge.infer.sequence import Generation, TextDecoder
from lmforge.model import Transformer

__all__ = [
    "Generation",
    "SamplingParams",
    "TextDecoder",
    "apply_repetition_penalty",
    "generate",
    "sample_next",
    "stream",
    "top_k_filter",
    "top_p_filter",
]


def _engine(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    tokenizer: TextDecoder | None,
    eos_id: int | None,
) -> Engine:
    """An engine with a slot per prompt and no more context than these prompts can use."""
    longest = max((len(p) for p in prompts), default=1)
    context = min(model.config.max_seq_len, longest + params.max_new_tokens - 1)
    return Engine(
        model,
        tokenizer,
        max_batch=len(prompts),
        max_context=context,
        prefix_cache_tokens=0,
        eos_id=eos_id,
    )


def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    tokenizer: TextDecoder | None = None,
    eos_id: int | None = None,
) -> list[Generation]:
    """Continue each prompt (token ids) in one batch. eos_id (default: the tokenizer's) and
    params.stop_token_ids end a sequence; text, when a tokenizer is given, ends before the first
    stop string. New tokens are clamped so that each prompt fits the context window; with a
    seed, prompt i samples with seed + i."""
    if not prompts:
        return []
    return _engine(model, prompts, params, tokenizer, eos_id).generate(prompts, params)


def stream(
    model: Transformer,
    prompt: list[int],
    params: SamplingParams,
    *,
    tokenizer: TextDecoder | None = None,
    eos_id: int | None = None,
) -> Iterator[str | int]:
    """Continue one prompt, yielding text pieces as they become printable when a tokenizer is
    given (incomplete characters and possible starts of a stop string are held back), else ids."""
    yield from _engine(model, [prompt], params, tokenizer, eos_id).stream(prompt, params)
