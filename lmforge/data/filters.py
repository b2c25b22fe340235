"""Heuristic quality filters (seed 002 §4.1.2 "statistic-based" and "keyword-based" filtering):
Gopher quality and repetition rules, C4 line and document rules, FineWeb rules, and keyword
blocklists, each CJK-aware.

Every filter is called on a document and returns None (keep) or the reason it was removed; a
filter may also edit `doc["text"]` (C4 drops lines). Word counts treat each CJK character as a
token, since Chinese and Japanese do not put spaces between words: a Chinese word is 1.5-2
characters on average, so character counts are a conservative (larger) stand-in for word counts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import regex

from lmforge.data.minhash import tokens

_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]")
_LETTER = regex.compile(r"\p{L}")
_WORDS = regex.compile(
    r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]|[^\s\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]+"
)
_PUNCT = regex.compile(r"^\p{P}+$")
# Gopher (Rae et al. 2021, appendix A.1.1): a document needs at least two of these English stop
# words; the Chinese list is the eight most frequent function characters of Chinese text.
STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
STOP_WORDS_ZH = {"的", "了", "是", "在", "和", "有", "我", "不", "这", "也", "就", "与"}
TERMINAL = (".", "!", "?", '"', "。", "！", "？", "…", "」", "』", "”", "）", ")")


def cjk_fraction(text: str) -> float:
    """The share of letters that are CJK characters (0 for text without letters)."""
    letters = len(_LETTER.findall(text))
    return len(_CJK.findall(text)) / letters if letters else 0.0


def words_of(text: str) -> list[str]:
    """Whitespace-separated words with punctuation-only tokens dropped; each CJK char one word."""
    return [w for w in _WORDS.findall(text) if not _PUNCT.match(w)]


class GopherQuality:
    """Rae et al. 2021, appendix A, table A1 (the published thresholds are the defaults)."""

    def __init__(
        self,
        min_words: int = 50,
        max_words: int = 100_000,
        min_mean_word_length: float = 3,
        max_mean_word_length: float = 10,
        max_symbol_word_ratio: float = 0.1,
        max_bullet_lines_ratio: float = 0.9,
        max_ellipsis_lines_ratio: float = 0.3,
        min_alpha_words_ratio: float = 0.8,
        min_stop_words: int = 2,
        cjk_threshold: float = 0.3,
    ) -> None:
        self.__dict__.update(locals())
        del self.__dict__["self"]

    def __call__(self, doc: dict) -> str | None:
        text = doc["text"]
        words = words_of(text)
        n = len(words)
        if n < self.min_words:
            return "gopher_short_document"
        if n > self.max_words:
            return "gopher_long_document"
        cjk = cjk_fraction(text) >= self.cjk_threshold
        # Mean word length says nothing about CJK text, where a "word" here is one character.
        if not cjk:
            mean = sum(map(len, words)) / n
            if mean < self.min_mean_word_length:
                return "gopher_below_avg_word_length"
            if mean > self.max_mean_word_length:
                return "gopher_above_avg_word_length"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > self.max_symbol_word_ratio:
            return "gopher_too_many_symbols"
        lines = text.splitlines()
        if lines:
            bullets = sum(line.lstrip().startswith(("•", "-", "*", "·")) for line in lines)
            if bullets / len(lines) > self.max_bullet_lines_ratio:
                return "gopher_too_many_bullets"
            ellipsis = sum(line.rstrip().endswith(("...", "…")) for line in lines)
            if ellipsis / len(lines) > self.max_ellipsis_lines_ratio:
                return "gopher_too_many_end_ellipsis"
        if sum(any(c.isalpha() for c in w) for w in words) / n < self.min_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        stops = STOP_WORDS_ZH if cjk else STOP_WORDS
        if sum(w.lower() in stops for w in words) < self.min_stop_words:
            return "gopher_enough_stop_words"
        return None


def _duplicates(elements: list[str]) -> tuple[int, int]:
    """(count, characters) of elements equal to an earlier one."""
    seen: set[str] = set()
    count = chars = 0
    for e in elements:
        if e in seen:
            count += 1
            chars += len(e)
        else:
            seen.add(e)
    return count, chars


class GopherRepetition:
    """Rae et al. 2021, table A1: duplicate lines/paragraphs and repeated n-grams, as fractions
    of lines, paragraphs or characters. N-grams are hashed to integers with numpy. In CJK text
    an n-gram counts characters, so n is doubled (two characters ~ one word)."""

    def __init__(
        self,
        dup_line_frac: float = 0.3,
        dup_para_frac: float = 0.3,
        dup_line_char_frac: float = 0.2,
        dup_para_char_frac: float = 0.2,
        top_n_grams: Sequence[Sequence[float]] = ((2, 0.2), (3, 0.18), (4, 0.16)),
        dup_n_grams: Sequence[Sequence[float]] = (
            (5, 0.15),
            (6, 0.14),
            (7, 0.13),
            (8, 0.12),
            (9, 0.11),
            (10, 0.10),
        ),  # fmt: skip
        cjk_threshold: float = 0.3,
    ) -> None:
        self.__dict__.update(locals())
        del self.__dict__["self"]

    def __call__(self, doc: dict) -> str | None:
        text = doc["text"]
        size = len(text)
        if size == 0:
            return None
        paragraphs = re.split(r"\n{2,}", text.strip())
        count, chars = _duplicates(paragraphs)
        if count / len(paragraphs) > self.dup_para_frac:
            return "gopher_dup_para_frac"
        if chars / size > self.dup_para_char_frac:
            return "gopher_dup_para_char_frac"
        lines = re.split(r"\n+", text)
        count, chars = _duplicates(lines)
        if count / len(lines) > self.dup_line_frac:
            return "gopher_dup_line_frac"
        if chars / size > self.dup_line_char_frac:
            return "gopher_dup_line_char_frac"
        words = words_of(text)
        if not words:
            return None
        scale = 2 if cjk_fraction(text) >= self.cjk_threshold else 1
        ids, lengths = _word_ids(words)
        for n, frac in self.top_n_grams:
            n = int(n) * scale
            if len(words) < n:
                continue
            # Characters of the most frequent n-gram times its count (words joined by spaces).
            grams = _ngram_hashes(ids, n)
            values, first, counts = np.unique(grams, return_index=True, return_counts=True)
            top = int(np.argmax(counts))  # ties: the smallest hash, any tie has equal count
            best = counts == counts[top]
            glen = _ngram_lengths(lengths, n)
            top_chars = int((glen[first[best]] * counts[best]).max())
            if top_chars / size > frac:
                return f"gopher_top_{int(n)}_gram"
        for n, frac in self.dup_n_grams:
            n = int(n) * scale
            if len(words) < n:
                continue
            if _repeated_ngram_chars(ids, lengths, n) / size > frac:
                return f"gopher_duplicated_{int(n)}_n_grams"
        return None


def _word_ids(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab) + 1) for w in words), dtype=np.uint64)
    return ids, np.fromiter(map(len, words), dtype=np.int64, count=len(words))


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    m = len(ids) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            h = h * np.uint64(0x100000001B3) + ids[i : i + m]
    return h


def _ngram_lengths(lengths: np.ndarray, n: int) -> np.ndarray:
    """Characters of each n-gram joined with single spaces."""
    c = np.concatenate([[0], np.cumsum(lengths)])
    return c[n:] - c[:-n] + (n - 1)


def _repeated_ngram_chars(ids: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """Gopher's duplicate n-gram character count: scanning left to right, an n-gram seen before
    counts its characters (without spaces, as the reference implementation) and is skipped."""
    grams = _ngram_hashes(ids, n).tolist()
    glen = (_ngram_lengths(lengths, n) - (n - 1)).tolist()
    seen: set[int] = set()
    chars = i = 0
    while i < len(grams):
        g = grams[i]
        if g in seen:
            chars += glen[i]
            i += n
        else:
            seen.add(g)
            i += 1
    return chars


class C4Filter:
    """Raffel et al. 2020 §2.2 (C4): keep lines ending in terminal punctuation with at least 3
    words, drop lines mentioning javascript or cookie/terms boilerplate, drop documents with
    "lorem ipsum" or a curly bracket, or fewer than 3 sentences (5 in datatrove's default)."""

    POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies")

    def __init__(
        self,
        min_words_per_line: int = 3,
        min_sentences: int = 5,
        max_word_length: int = 1000,
        drop_curly_bracket: bool = True,
        cjk_threshold: float = 0.3,
    ) -> None:
        self.__dict__.update(locals())
        del self.__dict__["self"]

    def __call__(self, doc: dict) -> str | None:
        text = doc["text"]
        low = text.lower()
        if "lorem ipsum" in low:
            return "c4_lorem_ipsum"
        if self.drop_curly_bracket and "{" in text:
            return "c4_curly_bracket"
        kept = []
        for line in text.splitlines():
            line = line.strip()
            words = words_of(line)
            if any(len(w) > self.max_word_length for w in words):
                continue
            if not line.endswith(TERMINAL) or line.endswith("..."):
                continue
            if len(words) < self.min_words_per_line:
                continue
            lower = line.lower()
            if "javascript" in lower or any(p in lower for p in self.POLICY):
                continue
            kept.append(line)
        out = "\n".join(kept)
        # Sentences: split on terminal punctuation (both ASCII and full-width).
        sentences = [s for s in regex.split(r"(?<=[.!?。！？])\s*", out) if s.strip()]
        if len(sentences) < self.min_sentences:
            return "c4_too_few_sentences"
        doc["text"] = out
        return None


class FineWebFilter:
    """Penedo et al. 2024 (FineWeb) rules, datatrove's thresholds: share of lines ending in
    punctuation >= 0.12, share of lines under 30 characters <= 0.67, characters in duplicated
    lines <= 1%, newlines per word <= 0.3. CJK lines are short in characters, so the short-line
    length is 10 characters there."""

    def __init__(
        self,
        line_punct_thr: float = 0.12,
        short_line_thr: float = 0.67,
        short_line_length: int = 30,
        short_line_length_cjk: int = 10,
        char_duplicates_ratio: float = 0.01,
        new_line_ratio: float = 0.3,
        cjk_threshold: float = 0.3,
    ) -> None:
        self.__dict__.update(locals())
        del self.__dict__["self"]

    def __call__(self, doc: dict) -> str | None:
        text = doc["text"]
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "fineweb_empty"
        if (
            sum(line.rstrip().endswith(TERMINAL) for line in lines) / len(lines)
            < self.line_punct_thr
        ):
            return "fineweb_line_punct_ratio"
        cjk = cjk_fraction(text) >= self.cjk_threshold
        short = self.short_line_length_cjk if cjk else self.short_line_length
        if sum(len(line) <= short for line in lines) / len(lines) > self.short_line_thr:
            return "fineweb_short_line_ratio"
        _, dup_chars = _duplicates(lines)
        if dup_chars / max(1, len(text.replace("\n", ""))) > self.char_duplicates_ratio:
            return "fineweb_char_dup_ratio"
        if text.count("\n") / max(1, len(words_of(text))) > self.new_line_ratio:
            return "fineweb_list_ratio"
        return None


def trie_pattern(words: Sequence[str]) -> str:
    """A regex alternation factored as a trie: matching then costs about one step per text
    character however many words there are (as Aho-Corasick), instead of one try per word."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        end = "" in node
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if end else body

    return build(trie)


class Blocklist:
    """Remove documents containing at least `min_hits` blocklisted words or phrases (case-
    insensitive; whole words for Latin script, any position for CJK)."""

    def __init__(self, words: Sequence[str] = (), file: str = "", min_hits: int = 1) -> None:
        items = [w.strip().lower() for w in words if w.strip()]
        if file:
            with open(file, encoding="utf-8") as f:
                items += [line.strip().lower() for line in f if line.strip()]
        if not items:
            raise ValueError("blocklist: give `words` or a `file` with one word or phrase a line")
        self.min_hits = min_hits
        self.pattern = regex.compile(
            r"(?<![\p{Latin}\p{N}])(?:" + trie_pattern(items) + r")(?![\p{Latin}\p{N}])"
        )

    def __call__(self, doc: dict) -> str | None:
        hits = self.pattern.findall(doc["text"].lower())
        if len(hits) >= self.min_hits:
            doc["meta"]["blocklist_hits"] = len(hits)
            return "blocklist"
        return None


def token_count(text: str) -> int:
    """Words plus CJK characters: the token estimate used by mixtures without a tokenizer."""
    return len(tokens(text))
