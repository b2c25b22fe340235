"""Instruction tuning data (seed 002 §5.1; seed 003 §3.4): formatted instances, templates, loss
masks, truncation, packing and task mixing.

An example is a conversation: `messages` with roles system/user/assistant (a user turn may carry
an `input` beside its instruction, Alpaca-style). A template renders it into text segments, each
marked as a target (assistant output: the loss is computed there) or context (everything else).
Segments are tokenized one by one so the loss mask lines up with token boundaries exactly.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.errors import ConfigError, CorpusError, LmforgeError
from lmforge.train.objectives import IGNORE_INDEX, output_loss

Template = Literal["auto", "ins", "alpaca", "chatml", "chat", "plain"]
ROLES = ("system", "user", "assistant")

# Alpaca (Taori et al. 2023), the prompt of the Stanford release.
ALPACA_HEADER = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
)


@dataclass
class Example:
    """One formatted instance as a conversation. Assistant turns with `"train": False` (e.g.
    demonstrations) are context, not targets; role "text" is plain pre-training text."""

    messages: list[dict[str, Any]]
    source: str = ""

    @classmethod
    def from_instance(
        cls,
        instruction: str,
        output: str,
        input: str = "",
        demonstrations: Sequence[dict] = (),
        source: str = "",
    ) -> Example:
        """Instruction + optional input -> output, preceded by optional demonstrations
        (dicts with instruction/input/output), which are context only (seed 002 §5.1.1)."""
        messages: list[dict[str, Any]] = []
        for d in demonstrations:
            messages.append(
                {"role": "user", "content": d["instruction"], "input": d.get("input", "")}
            )
            messages.append({"role": "assistant", "content": d["output"], "train": False})
        messages.append({"role": "user", "content": instruction, "input": input})
        messages.append({"role": "assistant", "content": output})
        return cls(messages, source)

    @classmethod
    def from_text(cls, text: str, source: str = "pretrain") -> Example:
        """Pre-training text mixed in as a regulariser: every token is a target."""
        return cls([{"role": "text", "content": text}], source)


def validate_example(example: Example, where: str) -> None:
    """Roles in order (optional system first, then user/assistant alternating, ending with an
    assistant turn) and non-empty string contents; LmforgeError naming `where` otherwise."""
    msgs = example.messages
    if not msgs:
        raise CorpusError(f"{where}: the example has no messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise CorpusError(f"{where}: message {i} needs a string 'content', got {m!r}")
        if m.get("role") not in (*ROLES, "text"):
            raise CorpusError(f"{where}: message {i} has unknown role {m.get('role')!r}")
    if msgs[0]["role"] == "text":
        if len(msgs) != 1:
            raise CorpusError(f"{where}: a 'text' example must be a single message")
        return
    turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
    roles = [m["role"] for m in turns]
    expected = ["user", "assistant"] * (len(roles) // 2 + 1)
    if not roles or roles != expected[: len(roles)] or roles[-1] != "assistant":
        raise CorpusError(
            f"{where}: roles out of order: {roles}; expected an optional system message, then "
            "user and assistant turns alternating, ending with an assistant turn"
        )
    if not any(m.get("train", True) for m in turns if m["role"] == "assistant"):
        raise CorpusError(f"{where}: no assistant turn is a training target")


# ---- readers ---------------------------------------------------------------------------------
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant"}  # fmt: skip


def example_from_record(record: dict, where: str) -> Example:
    """Alpaca ({instruction, input?, output}), ShareGPT ({conversations: [{from, value}]}),
    messages ({messages: [{role, content}]}) or prompt/completion records."""
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        ex = Example([dict(m) for m in record["messages"]], where)
    elif "conversations" in record:
        msgs = []
        for i, turn in enumerate(record["conversations"]):
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise CorpusError(f"{where}: turn {i} has unknown 'from' {turn.get('from')!r}")
            msgs.append({"role": role, "content": turn.get("value")})
        ex = Example(msgs, where)
    elif "instruction" in record or "output" in record:
        missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
        if missing:
            raise CorpusError(f"{where}: Alpaca-style example lacks {missing}")
        ex = Example.from_instance(
            record["instruction"],
            record["output"],
            record.get("input") or "",
            record.get("demonstrations") or (),
            where,
        )
    elif "prompt" in record or "completion" in record:
        missing = [k for k in ("prompt", "completion") if not isinstance(record.get(k), str)]
        if missing:
            raise CorpusError(f"{where}: prompt/completion example lacks {missing}")
        ex = Example(
            [{"role": "user", "content": record["prompt"]},
             {"role": "assistant", "content": record["completion"]}], where, )  # fmt: skip
    else:
        raise CorpusError(
            f"{where}: unrecognised example with keys {sorted(record)}; expected instruction/"
            "output (Alpaca), conversations (ShareGPT), messages, or prompt/completion"
        )
    validate_example(ex, where)
    return ex


def read_examples(path: str | Path) -> list[Example]:
    """Examples from a JSON list (Alpaca) or a JSONL file of records of any supported kind."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read {path}: {e}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except ValueError as e:
            raise CorpusError(f"{path} is not valid JSON: {e}") from None
        pairs = [(r, f"{path}[{i}]") for i, r in enumerate(records)]
    else:
        pairs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    pairs.append((json.loads(line), f"{path}:{n}"))
                except ValueError as e:
                    raise CorpusError(f"{path}:{n} is not valid JSON: {e}") from None
    if not pairs:
        raise CorpusError(f"{path} holds no examples")
    return [example_from_record(r, where) for r, where in pairs]


# ---- templates -------------------------------------------------------------------------------
def resolve_template(template: Template, tokenizer) -> str:
    """ "auto": the model's own chat template, else ChatML if its tokens exist, else [INS]."""
    if template != "auto":
        return template
    if tokenizer.chat_template is not None:
        return "chat"
    if tokenizer.token_to_id("<|im_start|>") is not None:
        return "chatml"
    return "ins"


def _user_text(m: dict) -> str:
    return f"{m['content']}\n\n{m['input']}" if m.get("input") else m["content"]


def render(example: Example, template: str, tokenizer) -> list[tuple[str, bool]]:
    """Text segments of the example and whether each is a training target."""
    msgs = example.messages
    eos = tokenizer.eos_token or ""
    if msgs[0]["role"] == "text":
        return [(msgs[0]["content"] + eos, True)]
    if template == "chat":
        return _render_chat(example, tokenizer)
    segments: list[tuple[str, bool]] = []
    for m in msgs:
        train = m["role"] == "assistant" and m.get("train", True)
        if template == "ins":
            # Seed 003 §3.4.2: "[INS]instruction[INS]output" marks where the instruction ends.
            if m["role"] == "system":
                segments.append((m["content"] + "\n", False))
            elif m["role"] == "user":
                extra = f"\n{m['input']}" if m.get("input") else ""
                segments.append((f"[INS]{m['content']}{extra}[INS]", False))
            else:
                segments.append((m["content"] + eos, train))
        elif template == "alpaca":
            if m["role"] == "system":
                segments.append((m["content"] + "\n\n", False))
            elif m["role"] == "user":
                head = ALPACA_HEADER.format(
                    with_input=", paired with an input that provides further context"
                    if m.get("input")
                    else ""
                )
                body = f"### Instruction:\n{m['content']}\n\n"
                if m.get("input"):
                    body += f"### Input:\n{m['input']}\n\n"
                segments.append((head + body + "### Response:\n", False))
            else:
                segments.append((m["content"] + eos, train))
                segments.append(("\n\n", False))
        elif template == "chatml":
            if m["role"] == "assistant":
                segments.append(("<|im_start|>assistant\n", False))
                segments.append((m["content"] + "<|im_end|>", train))
                segments.append(("\n", False))
            else:
                segments.append((f"<|im_start|>{m['role']}\n{_user_text(m)}<|im_end|>\n", False))
        elif template == "plain":
            segments.append((_user_text(m) if m["role"] != "assistant" else m["content"] + eos,
                             train))  # fmt: skip
        else:
            raise ConfigError(
                f"unknown template {template!r}; choose ins, alpaca, chatml, chat or plain"
            )
    return [(text, t) for text, t in segments if text]


def _render_chat(example: Example, tokenizer) -> list[tuple[str, bool]]:
    # The model's own Jinja template renders whole conversations only; an assistant turn is the
    # difference between the render up to it and the render with the generation prompt.
    msgs = [{"role": m["role"], "content": _user_text(m)} for m in example.messages]
    segments, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise LmforgeError(
                "the tokenizer's chat template does not render conversations prefix by prefix; "
                "use template=chatml or ins instead"
            )
        segments.append((prompt[len(done) :], False))
        answer = full[len(prompt) :]
        # The turn's end marker belongs to the target (the model must learn to stop); trailing
        # newlines after it are context.
        body = answer.rstrip("\n")
        segments.append((body, example.messages[i].get("train", True)))
        if answer[len(body) :]:
            segments.append((answer[len(body) :], False))
        done = full
    return [(text, t) for text, t in segments if text]


# ---- tokenization, masks and truncation ------------------------------------------------------
@dataclass
class Encoded:
    """Token ids of one example and which of them are targets."""

    tokens: list[int]
    target: list[bool]
    truncated: int = 0  # context tokens cut from the left to fit


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0  # examples whose context was cut to fit
    truncated_tokens: int = 0
    skipped: int = 0  # examples dropped because their output alone does not fit
    target_tokens: int = 0
    tokens: int = 0
    skipped_where: list[str] = field(default_factory=list)


def encode_example(
    example: Example,
    tokenizer,
    template: str,
    max_len: int,
    *,
    train_on_prompt: bool = False,
    where: str = "example",
) -> Encoded:
    """Tokens (<= max_len + 1: inputs and shifted targets) and target flags. Too-long examples
    lose context from the left; an output that cannot fit with at least one token of context is
    an error, never a silently empty answer."""
    segments = render(example, template, tokenizer)
    bos = [tokenizer.bos_id] if tokenizer.adds_bos and template != "chat" else []
    tokens, target = list(bos), [False] * len(bos)
    for text, is_target in segments:
        ids = tokenizer.encode(text)
        tokens += ids
        target += [is_target or train_on_prompt] * len(ids)
    if template != "chat" and train_on_prompt and bos:
        target[0] = False  # nothing predicts the first token
    # Inputs are tokens[:-1] and targets tokens[1:]: a window of max_len + 1 tokens.
    limit = max_len + 1
    cut = max(0, len(tokens) - limit)
    if cut:
        last_turn = _last_target_start(target)
        if last_turn - cut < 1:
            answer = len(target) - last_turn
            raise LmforgeError(
                f"{where}: the output ({answer} tokens) is longer than the sequence allows "
                f"(seq_len {max_len}, with at least one token of prompt); raise seq_len or "
                "shorten the output"
            )
        tokens, target = tokens[cut:], target[cut:]
        target[0] = False
    return Encoded(tokens, target, cut)


def _last_target_start(target: list[bool]) -> int:
    i = len(target)
    while i > 0 and not target[i - 1]:
        i -= 1
    while i > 0 and target[i - 1]:
        i -= 1
    return i


def encode_examples(
    examples: Sequence[Example],
    tokenizer,
    template: Template,
    max_len: int,
    *,
    train_on_prompt: bool = False,
    skip_too_long: bool = False,
) -> tuple[list[Encoded], EncodeStats]:
    """Encode all examples and count truncations; skip_too_long drops (and counts) examples whose
    output does not fit instead of failing."""
    template = resolve_template(template, tokenizer)
    out, stats = [], EncodeStats()
    for i, ex in enumerate(examples):
        where = ex.source or f"example {i}"
        validate_example(ex, where)
        try:
            enc = encode_example(
                ex, tokenizer, template, max_len, train_on_prompt=train_on_prompt, where=where
            )
        except LmforgeError:
            if not skip_too_long:
                raise
            stats.skipped += 1
            stats.skipped_where.append(where)
            continue
        out.append(enc)
        stats.examples += 1
        stats.truncated += enc.truncated > 0
        stats.truncated_tokens += enc.truncated
        stats.target_tokens += sum(enc.target[1:])
        stats.tokens += len(enc.tokens)
    return out, stats


# ---- batches: padded or packed ---------------------------------------------------------------
def _shifted(enc: Encoded) -> tuple[list[int], list[int]]:
    x = enc.tokens[:-1]
    y = [t if m else IGNORE_INDEX for t, m in zip(enc.tokens[1:], enc.target[1:])]
    return x, y


def pad_batch(encoded: Sequence[Encoded], seq_len: int, pad_id: int = 0) -> dict:
    """One example per row, right-padded: causal attention never lets a real token see a pad."""
    B = len(encoded)
    x = torch.full((B, seq_len), pad_id, dtype=torch.long)
    y = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    for row, enc in enumerate(encoded):
        xs, ys = _shifted(enc)
        x[row, : len(xs)], y[row, : len(ys)] = torch.tensor(xs), torch.tensor(ys)
    return {"input_ids": x, "labels": y}


def pack_batch(encoded: Sequence[Encoded], seq_len: int, pad_id: int = 0) -> dict:
    """Many short examples per row (first fit, in order): positions restart at 0 for each
    example and `segment_ids` give the block-diagonal attention (no example sees another)."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    for enc in encoded:
        xs, ys = _shifted(enc)
        k = next((r for r, free in enumerate(room) if free >= len(xs)), None)
        if k is None:
            rows.append([])
            room.append(seq_len)
            k = len(rows) - 1
        rows[k].append((xs, ys))
        room[k] -= len(xs)
    B = len(rows)
    x = torch.full((B, seq_len), pad_id, dtype=torch.long)
    y = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((B, seq_len), dtype=torch.long)
    seg = torch.full((B, seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, (xs, ys) in enumerate(row):
            n = len(xs)
            x[r, at : at + n], y[r, at : at + n] = torch.tensor(xs), torch.tensor(ys)
            pos[r, at : at + n] = torch.arange(n)
            seg[r, at : at + n] = s
            at += n
    return {"input_ids": x, "labels": y, "position_ids": pos, "segment_ids": seg}


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean mask: causal within each segment; padding (-1) sees only itself."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    eye = torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    return ((same & causal) | eye)[:, None]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [block.attn for block in model.blocks]


def forward_with_mask(
    model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None, **kwargs
) -> torch.Tensor:
    """model(input_ids) with a (B, 1, T, S) attention mask handed to every attention layer.

    Transformer.forward builds masks from padding only, so a forward pre-hook swaps in ours; it
    is registered first so prefix tuning's hook (which widens masks) sees it.
    """
    if mask is None:
        return model(input_ids, **kwargs)

    def hook(module, args):
        x, rope, _, *rest = args
        return (x, rope, mask, *rest)

    handles = [m.register_forward_pre_hook(hook, prepend=True) for m in attention_modules(model)]
    try:
        return model(input_ids, **kwargs)
    finally:
        for h in handles:
            h.remove()


def sft_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over target tokens; a batch without any target is an error (a mean
    over nothing would be reported as 0 and the step would silently train nothing)."""
    y = batch["labels"]
    n = int((y != IGNORE_INDEX).sum())
    if n == 0:
        raise LmforgeError(
            "every target in this batch is masked (no assistant tokens left): check the template, "
            "the truncation settings and that examples have non-empty outputs"
        )
    mask = segment_mask(batch["segment_ids"]) if "segment_ids" in batch else None
    kwargs = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    # output_loss applies the output layer chunk by chunk where it can (no full fp32 logits).
    return output_loss(
        model, lambda **kw: forward_with_mask(model, batch["input_ids"], mask, **kwargs, **kw), y
    )


class SFTData:
    """A batch source for the Trainer: each batch draws examples by a seed fixed by
    (seed, step, micro_step), so resume is exact; packed batches hold as many as fit."""

    def __init__(
        self, encoded: Sequence[Encoded], *, packing: bool = False, pad_id: int = 0
    ) -> None:
        if not encoded:
            raise CorpusError("no instruction examples to train on")
        self.encoded, self.packing, self.pad_id = list(encoded), packing, pad_id

    def _draw(self, n: int, rng: random.Random) -> list[Encoded]:
        return [self.encoded[rng.randrange(len(self.encoded))] for _ in range(n)]

    def get_batch(
        self, batch_size: int, seq_len: int, *, seed: int, step: int, micro_step: int = 0
    ) -> dict:
        rng = random.Random(f"{seed}:{step}:{micro_step}")
        if not self.packing:
            return pad_batch(self._draw(batch_size, rng), seq_len, self.pad_id)
        # Fill batch_size rows of seq_len tokens; examples are drawn until the rows are full.
        chosen, used = [], 0
        budget = batch_size * seq_len
        while True:
            enc = self._draw(1, rng)[0]
            if used + len(enc.tokens) - 1 > budget and chosen:
                break
            chosen.append(enc)
            used += len(enc.tokens) - 1
        batch = pack_batch(chosen, seq_len, self.pad_id)
        return {k: v[:batch_size] for k, v in batch.items()}

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None):
        n = len(self.encoded) if max_batches is None else batch_size * max_batches
        for i in range(0, min(n, len(self.encoded)), batch_size):
            yield pad_batch(self.encoded[i : i + batch_size], seq_len, self.pad_id)


# ---- mixing ----------------------------------------------------------------------------------
def mixing_rates(
    sizes: dict[str, int],
    *,
    strategy: Literal["proportional", "temperature"] = "proportional",
    cap: int | None = None,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Sampling rates of datasets (T5, Raffel et al. 2020 §3.5.2, as seed 002 §5.1.2 cites):
    examples-proportional r_i ∝ min(n_i, cap), or temperature r_i ∝ n_i^(1/T)."""
    if not sizes or any(n <= 0 for n in sizes.values()):
        raise ConfigError(f"mixing needs non-empty datasets, got sizes {sizes}")
    if strategy == "proportional":
        weights = {k: float(min(n, cap) if cap else n) for k, n in sizes.items()}
    elif strategy == "temperature":
        if temperature <= 0:
            raise ConfigError(f"mixing temperature must be > 0, got {temperature}")
        weights = {k: n ** (1.0 / temperature) for k, n in sizes.items()}
    else:
        raise ConfigError(
            f"unknown mixing strategy {strategy!r}; choose proportional or temperature"
        )
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def mix(
    datasets: dict[str, Sequence[Example]],
    total: int,
    *,
    strategy: Literal["proportional", "temperature"] = "proportional",
    cap: int | None = None,
    temperature: float = 1.0,
    pretrain_texts: Sequence[str] = (),
    pretrain_ratio: float = 0.0,
    seed: int = 0,
) -> tuple[list[Example], dict[str, dict[str, float]]]:
    """`total` examples drawn by the rates above (without replacement until a dataset runs out),
    plus pre-training text as `pretrain_ratio` of the result; returns the examples and the
    target vs realised proportion of each source."""
    if not 0 <= pretrain_ratio < 1:
        raise ConfigError(f"pretrain_ratio must be in [0, 1), got {pretrain_ratio}")
    if pretrain_ratio and not pretrain_texts:
        raise ConfigError("pretrain_ratio > 0 needs pre-training texts")
    rates = mixing_rates(
        {k: len(v) for k, v in datasets.items()},
        strategy=strategy,
        cap=cap,
        temperature=temperature,
    )
    rng = random.Random(seed)
    n_pretrain = round(total * pretrain_ratio)
    n_instruct = total - n_pretrain
    # Largest-remainder rounding keeps the counts summing to n_instruct.
    raw = {k: r * n_instruct for k, r in rates.items()}
    counts = {k: math.floor(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[
        : n_instruct - sum(counts.values())
    ]:
        counts[k] += 1
    out: list[Example] = []
    for name, n in counts.items():
        data = list(datasets[name])
        order: list[int] = []
        while len(order) < n:
            order += rng.sample(range(len(data)), len(data))
        out += [Example(data[i].messages, data[i].source or name) for i in order[:n]]
    texts = list(pretrain_texts)
    out += [Example.from_text(texts[rng.randrange(len(texts))]) for _ in range(n_pretrain)]
    rng.shuffle(out)
    targets = {k: r * (1 - pretrain_ratio) for k, r in rates.items()}
    if n_pretrain:
        targets["pretrain"] = pretrain_ratio
    realised = {**counts, **({"pretrain": n_pretrain} if n_pretrain else {})}
    report = {
        k: {"target": targets[k], "realised": realised[k] / max(1, total), "examples": realised[k]}
        for k in targets
    }
    return out, report
