"""Prompt builders for in-context learning: k-shot demonstrations, chain-of-thought and
self-consistency, as plain text or through a chat template.

Seed 000 "能力引导": a model's abilities show only under the right instructions or ICL strategy;
seed 004 "CoT": chain-of-thought prompting (Wei et al. 2022, few-shot exemplars with rationales;
Kojima et al. 2022, zero-shot "Let's think step by step") and self-consistency (Wang et al. 2023,
majority vote over sampled rationales).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from lmforge.errors import LmforgeError

T = TypeVar("T")

# Kojima et al. 2022, "Large Language Models are Zero-Shot Reasoners", Table 4's best trigger.
ZERO_SHOT_COT_TRIGGER = "Let's think step by step."


@dataclass(frozen=True)
class PromptFormat:
    """How demonstrations and the query are joined, as lm-eval does: description, then each
    demonstration as text + target_delimiter + target + fewshot_delimiter, then the query."""

    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"


def sample_fewshot(
    pool: Sequence[T],
    k: int,
    *,
    seed: int,
    key: str = "",
    exclude: int | None = None,
    task: str = "",
) -> list[T]:
    """k demonstrations drawn without replacement from `pool`, leaving out index `exclude` (the
    item itself when demonstrations come from the evaluated split). The draw depends only on
    (seed, key), not on which other items were evaluated or in what order."""
    candidates = [i for i in range(len(pool)) if i != exclude]
    if k > len(candidates):
        raise LmforgeError(
            f"{task or 'few-shot'}: asked for {k} demonstrations but the few-shot split has only "
            f"{len(candidates)} usable item(s)"
        )
    rng = random.Random(f"{seed}:{key}")
    return [pool[i] for i in rng.sample(candidates, k)]


def build_prompt(query: str, demos: Sequence[tuple[str, str]], fmt: PromptFormat) -> str:
    """The text prompt: description, demonstrations (input, target) and the query input."""
    shots = "".join(
        f"{text}{fmt.target_delimiter}{target}{fmt.fewshot_delimiter}" for text, target in demos
    )
    return f"{fmt.description}{shots}{query}"


def chat_messages(
    query: str, demos: Sequence[tuple[str, str]], fmt: PromptFormat
) -> list[dict[str, str]]:
    """The same prompt as a conversation: the description as the system turn and each
    demonstration as a user/assistant exchange (lm-eval's fewshot_as_multiturn)."""
    messages = [{"role": "system", "content": fmt.description.strip()}] if fmt.description else []
    for text, target in demos:
        messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": target},
        ]
    return messages + [{"role": "user", "content": query}]


def chat_prompt(tokenizer, query: str, demos: Sequence[tuple[str, str]], fmt: PromptFormat) -> str:
    """Render chat_messages with the tokenizer's chat template, ready for the assistant's turn."""
    return tokenizer.apply_chat_template(
        chat_messages(query, demos, fmt), add_generation_prompt=True
    )


def zero_shot_cot(query: str, fmt: PromptFormat) -> str:
    """Append the zero-shot CoT trigger after the answer cue (Kojima et al. 2022)."""
    return f"{query}{fmt.target_delimiter}{ZERO_SHOT_COT_TRIGGER}"


def majority_vote(answers: Sequence[str], invalid: str = "[invalid]") -> str:
    """Self-consistency: the most frequent extracted answer; ties go to the one seen first;
    failed extractions vote only when nothing else does."""
    valid = [a for a in answers if a != invalid]
    if not valid:
        return invalid
    counts = Counter(valid)
    best = max(counts.values())
    return next(a for a in valid if counts[a] == best)
