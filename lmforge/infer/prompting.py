"""Prompt builders for in-context learning: k-shot demonstrations, chain-of-thought and
self-consistency, as plain text or through a chat template.

Seed 000 "能力引导": a model's abilities show only under the right instructions or ICL strategy;
seed 004 "CoT": chain-of-thought prompting (Wei et al. 2022, few-shot exemplars with rationales;
Kojima et al. 2022, zero-shot "Let's think step by step") and self-consistency (Wang et al. 2023,
majority vote over sampled rationales).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.infer.retrieval import BM25
from lmforge.infer.sampling import SamplingParams

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


# --- Demonstration selection and ordering -----------------------------------------------------
# Brown et al. 2020 (GPT-3) draw k demonstrations at random; Liu et al. 2022 ("What Makes Good
# In-Context Examples for GPT-3?", KATE) pick the k nearest to the query and find the order with
# the most similar one last (next to the query) works best; diverse selection (maximal marginal
# relevance, Carbonell & Goldstein 1998) trades similarity to the query against redundancy.

Embed = Callable[[list[str]], Sequence[Sequence[float]]]


def _similarities(query: str, texts: Sequence[str], embed: Embed | None) -> np.ndarray:
    """(1 + len(texts))^2 similarities among [query, *texts]: cosine of `embed` vectors, or BM25
    scores of each text used as a query, divided by its score against itself (so 1 = itself)."""
    everything = [query, *texts]
    if embed is not None:
        v = np.asarray(embed(everything), dtype=np.float64)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return v @ v.T
    index = BM25(everything)
    sims = np.array([index.scores(t) for t in everything])
    return sims / np.maximum(np.diag(sims)[:, None], 1e-12)


def select_demos(
    query: str,
    pool: Sequence[tuple[str, str]],
    k: int,
    *,
    method: Literal["random", "similar", "diverse"] = "random",
    order: Literal["given", "random", "similar_last"] = "given",
    seed: int = 0,
    embed: Embed | None = None,
    diversity: float = 0.5,
) -> list[tuple[str, str]]:
    """k (input, target) demonstrations from `pool` for `query`.

    method: "random" (Brown et al. 2020), "similar" (the k nearest by BM25, or by cosine of
    `embed` vectors when given; Liu et al. 2022) or "diverse" (MMR: each pick maximises
    (1 - diversity) * sim(query, d) - diversity * max sim(d, picked)).
    order: "given" (pool order), "random", or "similar_last" (least to most similar).
    """
    if k > len(pool):
        raise LmforgeError(f"asked for {k} demonstrations but the pool has only {len(pool)}")
    if k <= 0:
        return []
    rng = random.Random(f"{seed}:{query}")
    sims = None
    if method == "random":
        picked = rng.sample(range(len(pool)), k)
    else:
        sims = _similarities(query, [text for text, _ in pool], embed)
        to_query = sims[0, 1:]
        if method == "similar":
            picked = sorted(range(len(pool)), key=lambda i: -to_query[i])[:k]
        elif method == "diverse":
            picked = []
            for _ in range(k):
                rest = [i for i in range(len(pool)) if i not in picked]
                redundancy = [max((sims[i + 1, j + 1] for j in picked), default=0.0) for i in rest]
                gains = [
                    (1 - diversity) * to_query[i] - diversity * r for i, r in zip(rest, redundancy)
                ]
                picked.append(rest[int(np.argmax(gains))])
        else:
            raise LmforgeError(f"unknown selection {method!r}; use random, similar or diverse")
    if order == "given":
        picked = sorted(picked)
    elif order == "random":
        rng.shuffle(picked)
    elif order == "similar_last":
        if sims is None:
            sims = _similarities(query, [pool[i][0] for i in picked], embed)
            rank = {i: sims[0, 1 + n] for n, i in enumerate(picked)}
        else:
            rank = {i: sims[0, 1 + i] for i in picked}
        picked = sorted(picked, key=lambda i: rank[i])
    else:
        raise LmforgeError(f"unknown order {order!r}; use given, random or similar_last")
    return [pool[i] for i in picked]


def icl_prompt(
    query: str,
    pool: Sequence[tuple[str, str]],
    k: int,
    fmt: PromptFormat = PromptFormat(),
    **selection,
) -> str:
    """A k-shot prompt: `fmt.description`, k demonstrations chosen by `select_demos(**selection)`
    joined with fmt's delimiters, then the query."""
    return build_prompt(query, select_demos(query, pool, k, **selection), fmt)


# --- Chain-of-thought, answer extraction, self-consistency ------------------------------------

INVALID = "[invalid]"  # the same marker as evaluation.metrics.INVALID
# Wei et al. 2022 write each exemplar as "Q: ... A: <rationale> The answer is N."
COT_FORMAT = PromptFormat(description="", target_delimiter="\nA: ", fewshot_delimiter="\n\n")
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def cot_demo(question: str, rationale: str, answer: str) -> tuple[str, str]:
    """A chain-of-thought exemplar (input, target) in the Wei et al. 2022 format."""
    return f"Q: {question}", f"{rationale} The answer is {answer}."


def cot_query(question: str, zero_shot: bool = False) -> str:
    """The query after CoT exemplars; zero_shot adds Kojima et al.'s trigger after "A:"."""
    return f"Q: {question}" + (
        f"{COT_FORMAT.target_delimiter}{ZERO_SHOT_COT_TRIGGER}" if zero_shot else ""
    )


def with_calculator_calls(rationale: str) -> str:
    """A rationale whose "a op b = c" steps become calculator calls, "<calc>a op b</calc>
    <result>c</result>", so demonstrations teach the call syntax of lmforge.infer.tools
    (Toolformer-style annotated text, Schick et al. 2023)."""
    pattern = rf"({_NUMBER}(?:\s*[-+*/×÷]\s*{_NUMBER})+)\s*=\s*({_NUMBER})"
    return re.sub(pattern, r"<calc>\1</calc><result>\2</result>", rationale)


def normalize_number(text: str) -> str:
    """ "1,234.0" -> "1234"; "$5" -> "5"; non-numbers are returned stripped."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        x = float(t)
    except ValueError:
        return text.strip()
    return str(int(x)) if x.is_integer() else t


def extract_answer(text: str) -> str:
    """The final answer of a rationale, trying in order: GSM8K's "#### N" line (Cobbe et al.
    2021), "The answer is N" (Wei et al. 2022), then the last number; INVALID when none."""
    for pattern in (rf"####\s*({_NUMBER})", rf"[Tt]he (?:final )?answer is:?\s*({_NUMBER})"):
        if found := re.findall(pattern, text):
            return normalize_number(found[-1])
    if found := re.findall(_NUMBER, text):
        return normalize_number(found[-1])
    return INVALID


@dataclass(frozen=True)
class Vote:
    """Self-consistency's outcome: the winning answer, its share of all samples, every answer."""

    answer: str
    share: float
    answers: list[str]


def vote(texts: Sequence[str], extract: Callable[[str], str] = extract_answer) -> Vote:
    """Majority vote over the answers extracted from sampled rationales (Wang et al. 2023);
    the share counts every sample, failed extractions included."""
    answers = [extract(t) for t in texts]
    answer = majority_vote(answers, INVALID)
    share = answers.count(answer) / len(answers) if answers else 0.0
    return Vote(answer, share, answers)


def self_consistency(
    engine,
    prompt: Sequence[int],
    params: SamplingParams,
    n: int,
    extract: Callable[[str], str] = extract_answer,
) -> tuple[Vote, list[str]]:
    """Sample n rationales for one prompt as one engine batch (the prompt's keys/values are
    computed once and shared through the prefix cache), then vote; returns (vote, texts)."""
    if n < 1:
        raise LmforgeError(f"self-consistency needs n >= 1 samples, got {n}")
    if params.temperature == 0 and n > 1:
        raise LmforgeError("self-consistency needs temperature > 0: greedy samples are identical")
    texts = [g.text for g in engine.generate([list(prompt)] * n, params)]
    return vote(texts, extract), texts


def arithmetic_cot_demos(k: int = 8, calculator: bool = False) -> list[tuple[str, str]]:
    """Chain-of-thought exemplars from the train split of the rule-generated arithmetic task
    (lmforge.data.synthetic; its test split is what gets scored), with calculator calls when
    asked. Wei et al. 2022 wrote 8 exemplars by hand; these are generated the same way."""
    from lmforge.data.synthetic import generate

    demos = []
    for item in generate("arithmetic", k, split="train"):
        rationale = with_calculator_calls(item.rationale) if calculator else item.rationale
        demos.append(cot_demo(item.question, rationale, item.answer))
    return demos
