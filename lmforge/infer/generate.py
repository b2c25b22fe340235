"""Generation with a KV cache: sampling, batches of prompts of different lengths, stop tokens and
strings, and streaming text for a chat loop."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from lmforge.model import Transformer


class TextDecoder(Protocol):
    """The part of a tokenizer that generation uses."""

    @property
    def eos_id(self) -> int | None: ...

    def decode(self, ids: list[int]) -> str: ...


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


@dataclass
class Generation:
    """The continuation of one prompt: new tokens (stop token excluded) and their text."""

    tokens: list[int]
    text: str | None
    finish_reason: Literal["stop", "length"]


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


class _Detokenizer:
    """Turns a growing list of ids into text, decoding only a short window at the end.

    The window starts one step before the unread ids because tokenizers such as SentencePiece
    render a token differently at the start of a text (no leading space); the text of the window's
    already-read part is subtracted. Text ending in U+FFFD is held back: a multi-byte character
    is split across tokens and the next token completes it.
    """

    def __init__(self, tokenizer: TextDecoder) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # window start
        self.read = 0  # ids[:read] have been turned into text

    def push(self, token: int) -> str:
        """Add a token; return the text that became printable (often "")."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """The held-back text at the end of generation (may contain U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        done = self.tokenizer.decode(self.ids[self.start : self.read])
        window = self.tokenizer.decode(self.ids[self.start :])
        if window.endswith("\ufffd") and not final:
            return ""
        self.start, self.read = self.read, len(self.ids)
        return window[len(done) :]


class _Sequence:
    """One prompt's generation state: new tokens, their text so far and why it stopped."""

    def __init__(
        self,
        prompt: list[int],
        max_new: int,
        stop_ids: set[int],
        stop_strings: Sequence[str],
        tokenizer: TextDecoder | None,
    ) -> None:
        self.prompt, self.max_new = prompt, max_new
        self.stop_ids, self.stop_strings = stop_ids, stop_strings
        self.detokenizer = _Detokenizer(tokenizer) if tokenizer is not None else None
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: Literal["stop", "length"] | None = None

    def push(self, token: int) -> bool:
        """Record the next token; return True once the sequence is finished."""
        if token in self.stop_ids:
            return self._finish("stop")
        self.tokens.append(token)
        if self.detokenizer is not None:
            piece = self.detokenizer.push(token)
            self.text += piece
            if piece and self.stop_strings and self._cut_at_stop_string(len(piece)):
                return True
        if len(self.tokens) == self.max_new:
            return self._finish("length")
        return False

    def _cut_at_stop_string(self, new_chars: int) -> bool:
        # Earlier text was checked on previous steps, so only matches ending in the new chars count.
        longest = max(len(s) for s in self.stop_strings)
        start = max(0, len(self.text) - new_chars - longest + 1)
        hits = [i for s in self.stop_strings if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.finish_reason = "stop"
        return True

    def _finish(self, reason: Literal["stop", "length"]) -> bool:
        if self.detokenizer is not None:
            self.text += self.detokenizer.flush()
        self.finish_reason = reason
        return True


def _prepare(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    tokenizer: TextDecoder | None,
    eos_id: int | None,
) -> list[_Sequence]:
    """Check the prompts against the context window and set up one _Sequence per prompt."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot generate from an empty prompt (give at least one token, e.g. BOS)")
    if params.stop_strings and tokenizer is None:
        raise ValueError("SamplingParams.stop_strings need a tokenizer to decode the output")
    limit, longest = model.config.max_seq_len, max(len(p) for p in prompts)
    if longest > limit:
        raise ValueError(f"prompt of {longest} tokens exceeds the model's max_seq_len {limit}")
    # The last new token is never fed back, so a prompt of n tokens leaves room for limit - n + 1.
    max_new = min(params.max_new_tokens, limit - longest + 1)
    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.eos_id
    stop_ids = set(params.stop_token_ids) | ({eos_id} if eos_id is not None else set())
    return [_Sequence(list(p), max_new, stop_ids, params.stop_strings, tokenizer) for p in prompts]


def _left_pad(
    prompts: list[list[int]], pad_id: int, new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, longest) ids padded on the left, and an attention mask with `new_tokens` more columns
    of ones for the tokens to come, sliced per step (None when no row is padded, which keeps
    SDPA on its fastest path)."""
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.ones(len(prompts), longest + new_tokens, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :] = torch.tensor(p)
        mask[row, : longest - len(p)] = 0
    return ids, (mask if min(lengths) < longest else None)


@torch.inference_mode()
def _decode(
    model: Transformer, seqs: list[_Sequence], params: SamplingParams, pad_id: int
) -> Iterator[None]:
    """Prefill all prompts at once, then decode one token per step with the KV cache, pushing
    each token into its sequence and yielding after each step. Finished rows leave the batch so
    they cost nothing."""
    prompts = [s.prompt for s in seqs]
    longest, max_new = max(len(p) for p in prompts), seqs[0].max_new
    cache = model.new_cache(len(seqs), max_len=longest + max_new - 1)
    device = cache.k.device
    ids, mask = _left_pad(prompts, pad_id, max_new)
    ids, mask = ids.to(device), (mask.to(device) if mask is not None else None)
    # Positions are passed explicitly so the model need not cumsum the mask every step.
    positions = torch.tensor([[len(p)] for p in prompts], device=device)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(len(seqs), model.config.vocab_size, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            seen[row, p] = True
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device).manual_seed(params.seed)

    prefill_mask = mask[:, :longest] if mask is not None else None
    logits = model(ids, attention_mask=prefill_mask, cache=cache, logits_to_keep=1)[:, -1]
    active = list(seqs)
    while True:
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        tokens = sample_next(logits, params, generator)
        # tolist() is the step's one host sync.
        done = [s.push(t) for s, t in zip(active, tokens.tolist(), strict=True)]
        yield
        if any(done):
            keep = [row for row, d in enumerate(done) if not d]
            if not keep:
                return
            index = torch.tensor(keep, device=device)
            cache.reorder(index)
            active, tokens, positions = [active[r] for r in keep], tokens[index], positions[index]
            mask = mask[index] if mask is not None else None
            seen = seen[index] if seen is not None else None
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        step_mask = mask[:, : cache.length + 1] if mask is not None else None
        logits = model(
            tokens[:, None],
            attention_mask=step_mask,
            position_ids=positions,
            cache=cache,
            logits_to_keep=1,
        )[:, -1]
        positions = positions + 1


def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    tokenizer: TextDecoder | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> list[Generation]:
    """Continue each prompt (token ids) in one batch. eos_id (default: the tokenizer's) and
    params.stop_token_ids end a sequence; text, when a tokenizer is given, ends before the first
    stop string. New tokens are clamped so that the longest prompt fits the context window."""
    if not prompts:
        return []
    seqs = _prepare(model, prompts, params, tokenizer, eos_id)
    for _ in _decode(model, seqs, params, pad_id):
        pass
    return [
        Generation(s.tokens, s.text if tokenizer is not None else None, s.finish_reason)
        for s in seqs
    ]


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
    (seq,) = _prepare(model, [prompt], params, tokenizer, eos_id)
    sent = 0
    for _ in _decode(model, [seq], params, pad_id=0):
        if tokenizer is None:
            yield from seq.tokens[sent:]
            sent = len(seq.tokens)
            continue
        end = len(seq.text)
        if seq.finish_reason is None:
            end -= _partial_stop_string(seq.text, params.stop_strings)
        if end > sent:
            yield seq.text[sent:end]
            sent = end


def _partial_stop_string(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of some stop string."""
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
