"""Per-item scores and their aggregates, written to give lm-evaluation-harness's numbers.

Formulas follow lm-eval 0.4 (`lm_eval/api/metrics.py`, `lm_eval/filters/extraction.py`) and the
SQuAD v1.1 evaluation script, so scores are comparable with published tables.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# GSM8K scoring in lm-eval (tasks/gsm8k/gsm8k.yaml): "strict-match" wants the "#### N" line the
# training rationales end with; "flexible-extract" takes the last number-like span anywhere.
STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
INVALID = "[invalid]"


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if len(values) else float("nan")


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample std (n - 1) / sqrt(n), as lm-eval's mean_stderr."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def multiple_choice_scores(
    logliks: Sequence[float], choices: Sequence[str], gold: int | Sequence[int]
) -> dict[str, float]:
    """acc: argmax of log-likelihood; acc_norm: argmax of log-likelihood / characters of the
    choice text (lm-eval divides by len(choice), the choice without the target delimiter).
    Ties go to the first choice (np.argmax). `gold` may list several correct choices (BIG-bench
    marks every choice with the top score as correct)."""
    golds = {gold} if isinstance(gold, int) else set(gold)
    lls = np.array(logliks, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lengths))
    return {
        "acc": float(pred in golds),
        "acc_norm": float(pred_norm in golds),
        "pred": pred,
        "pred_norm": pred_norm,
    }


@dataclass(frozen=True)
class Normalization:
    """How exact match compares strings (lm-eval's exact_match options, plus SQuAD's article and
    whitespace rules). Regexes are removed first, then case, punctuation, articles, whitespace."""

    ignore_case: bool = False
    ignore_punctuation: bool = False
    ignore_articles: bool = False
    ignore_whitespace: bool = False
    regexes_to_ignore: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, options: dict) -> Normalization:
        regexes = tuple(options.get("regexes_to_ignore", ()))
        return cls(**{**options, "regexes_to_ignore": regexes})

    def __call__(self, text: str) -> str:
        for pattern in self.regexes_to_ignore:
            text = re.sub(pattern, "", text)
        if self.ignore_case:
            text = text.lower()
        if self.ignore_punctuation:
            text = text.translate(str.maketrans("", "", string.punctuation))
        if self.ignore_articles:
            text = re.sub(r"\b(a|an|the)\b", " ", text, flags=re.IGNORECASE)
        if self.ignore_whitespace:
            text = " ".join(text.split())
        return text


def exact_match(prediction: str, references: str | Sequence[str], norm: Normalization) -> float:
    refs = [references] if isinstance(references, str) else list(references)
    return float(any(norm(prediction) == norm(r) for r in refs))


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 normalize_answer: lower case, drop punctuation and articles, collapse spaces."""
    return Normalization(True, True, True, True)(text)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token F1 (bag-of-tokens overlap after normalisation), max over the references."""
    refs = [references] if isinstance(references, str) else list(references)
    best = 0.0
    pred = squad_normalize(prediction).split()
    for ref in refs:
        gold = squad_normalize(ref).split()
        same = sum((Counter(pred) & Counter(gold)).values())
        if same == 0:
            continue
        precision, recall = same / len(pred), same / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def extract_answer(text: str, pattern: str, group_select: int = 0, fallback: str = INVALID) -> str:
    """lm-eval's RegexFilter: the `group_select`-th match of `pattern` (negative counts from the
    end); with several groups, the first non-empty one; stripped; `fallback` when none matches."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    try:
        match = matches[group_select]
    except IndexError:
        return fallback
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def extract_strict(text: str) -> str:
    return extract_answer(text, STRICT_PATTERN, 0)


def extract_flexible(text: str) -> str:
    return extract_answer(text, FLEXIBLE_PATTERN, -1)


def perplexity_aggregates(
    logliks: Sequence[float], tokens: Sequence[int], words: Sequence[int], nbytes: Sequence[int]
) -> dict[str, float]:
    """Corpus-level perplexities from per-document summed log-likelihoods: token, word and byte
    perplexity exp(-sum ll / sum units) and bits per byte -sum ll / sum bytes / ln 2 (lm-eval's
    weighted_perplexity and bits_per_byte)."""
    total = float(sum(logliks))
    return {
        "token_perplexity": math.exp(-total / sum(tokens)),
        "word_perplexity": math.exp(-total / sum(words)),
        "byte_perplexity": math.exp(-total / sum(nbytes)),
        "bits_per_byte": -total / sum(nbytes) / math.log(2),
    }


def bootstrap_stderr(
    fn, columns: Sequence[Sequence[float]], iters: int = 200, seed: int = 1234
) -> float:
    """Standard error of a corpus-level statistic by a seeded bootstrap over documents (lm-eval
    bootstraps such metrics too); `fn` maps resampled columns to a number."""
    n = len(columns[0])
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(c, dtype=np.float64) for c in columns]
    stats = []
    for _ in range(iters):
        idx = rng.integers(0, n, n)
        stats.append(fn(*(a[idx] for a in arrays)))
    return float(np.std(stats, ddof=1))
