"""Heuristic quality filters (seed 002 §4.1.2 "statistic-based" and "keyword-based" filtering):
Gopher quality and repetition rules, C4 line and document rules, FineWeb rules, and keyword
blocklists, each CJK-aware.

Every filter is called on a document and returns None (keep) or the reason it was removed; a
filter may also edit `doc["text"]` (C4 drops lines). Word counts treat each CJK character as a
token, since Chinese and Japanese do not put spaces between words: a Chinese word is 1.5-2
characters on average, so character counts are a conservative (larger) stand-in for word counts.
The Gopher rules count English words as datatrove does (spaCy tokens, see `english_words`), so
that their decisions match the reference implementation (docs/data.md, "Gopher word counting").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

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


# --- English words as datatrove's Gopher filters count them -------------------------------------
# datatrove (the reference implementation FineWeb used) splits English with spaCy's blank "en"
# tokenizer: punctuation becomes tokens of its own ("end." -> "end", "."), contractions split
# ("don't" -> "do", "n't"), abbreviations and emoticons stay whole ("e.g.", "):"). The rules
# below are spaCy 3's English prefix/suffix/infix rules and the tokenizer exceptions that occur
# in real text, in pure Python: same tokens as spaCy on all 3,000 benchmark documents.


def _items(spaced: str) -> list[str]:
    """spaCy writes its character lists space-separated; they are kept in that form."""
    return spaced.split()


_SP_PUNCT = _items(
    r"… …… , : ; \! \? ¿ ؟ ¡ \( \) \[ \] \{ \} < > _ # \* & 。 ？ ！ ， 、 ； ： ～ · । ، ۔ ؛ ٪"
)
_SP_QUOTES = _items(
    r"' \" ” “ ` ‘ ´ ’ ‚ , „ » « 「 」 『 』 （ ） 〔 〕 【 】 《 》 〈 〉 〈 〉 ⟦ ⟧"
)
_SP_CURRENCY = _items(
    r"\$ £ € ¥ ฿ US\$ C\$ A\$ ₽ ﷼ ₴ ₠ ₡ ₢ ₣ ₤ ₥ ₦ ₧ ₨ ₩ ₪ ₫ ₭ ₮ ₯ ₰ ₱ ₲ ₳ ₵ ₶ ₷ ₸ ₹ ₺ ₻ ₼ ₾ ₿"
)
_SP_UNITS = _items(
    "km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz "
    "m/s km/h kmh mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K %"
)
_SP_SPECIAL = [r"\.\.+", "…", r"\p{So}"]  # ellipses and symbols: prefix, suffix and infix
# Inside spaCy's look-behind classes: its PUNCT and quote lists, "|" separators included.
_P = r"…,:;!?¿؟¡()\[\]{}<>_#*&。？！，、；：～·।،۔؛٪|"
_Q = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉⟦⟧|"
_PREFIX = regex.compile(
    "|".join(
        f"^(?:{p})"
        for p in ["§", "%", "=", "—", "–", r"\+(?![0-9])"]
        + _SP_PUNCT
        + _SP_SPECIAL[:2]
        + _SP_QUOTES
        + _SP_CURRENCY
        + _SP_SPECIAL[2:]
    )  # fmt: skip
)
_SUFFIX = regex.compile(
    "|".join(
        f"(?:{p})$"
        for p in _SP_PUNCT
        + _SP_SPECIAL
        + _SP_QUOTES
        + ["'s", "'S", "’s", "’S", "—", "–"]
        + [
            r"(?<=[0-9])\+",
            r"(?<=°[FfCcKk])\.",
            r"(?<=[0-9])(?:" + "|".join(_SP_CURRENCY) + ")",
            r"(?<=[0-9])(?:" + "|".join(map(regex.escape, _SP_UNITS)) + ")",
            rf"(?<=[0-9\p{{Ll}}%²\-\+{_P}(?:{_Q})])\.",
            r"(?<=\p{Lu}\p{Lu})\.",
        ]
    )  # fmt: skip
)
_INFIX = regex.compile(
    "|".join(
        _SP_SPECIAL
        + [
            r"(?<=[0-9])[+\-\*^](?=[0-9-])",
            rf"(?<=[\p{{Ll}}{_Q}])\.(?=[\p{{Lu}}{_Q}])",
            r"(?<=\p{L}),(?=\p{L})",
            r"(?<=[\p{L}0-9])(?:-|–|—|--|---|——|~)(?=\p{L})",
            r"(?<=[\p{L}0-9])[:<>=/](?=\p{L})",
        ]
    )
)
_URL = regex.compile(
    r"(?:[\w+.-]{2,}://)?(?:\S+(?::\S*)?@)?(?:(?:[^\W_][\w-]{0,62})?[^\W_]\.)+\p{Ll}{2,63}(?::\d{2,5})?"
    r"(?:[/?#]\S*)?$"
)
# spaCy's English exceptions: contractions split in two, abbreviations and emoticons kept whole.
_NEG = "ai|are|ca|could|dare|did|does|do|had|has|have|is|may|might|must|need|ought|sha|should|was"
_PRON = "i|you|he|she|it|we|they|that|there|these|this|those|what|when|where|who|why|how"
_CONTRACTION = regex.compile(
    rf"(?i)({_NEG}|were|wo|would)(n['’]t|nt)((?<=')'ve|(?<=’)’ve|(?<=t)ve)?"
    rf"|({_PRON})(['’]?(?:d|ll|re|ve|m|s))((?<=d|ll)'ve)?"
    r"|(could|would|should|might|must)('ve|ve)|(can)(not)|(let)('s)|(gon)(na)|(got)(ta)|(1[0-2]|[1-9])([ap]\.?m\.?)"
)
_NOT_CONTRACTED = set(_items("its ill well were hell shell whore shed wes is here"))
_WHOLE = set(
    _items(
        "): (: :) :( :] [: :* 8) :') '' ’’ :/ =) =( :-) ;) :D :P :p :0 :1 :3 :> :| :} =/ =] =[ [= ]= "
        "=| =3 =D <3 </3 C++ and/or w/o 0.0 o.o <.< >.< >.> -_- ^_^ [-: (= (; :o :x :X :O o_o O_O "
        ":(( :)) :-( :-/ :-P :-D :-] :-| :-} :-* :-3 :-> 8-) 8D XD (-8 <space> 'cause 'bout 'cos ol' Ol' xD ;D ;-) ;_; @_@ ._. 'S 's 'd "
        "'ll 're 'em ' — ’ e.g. i.e. E.g. I.e. E.G. I.E. Ph.D. a.m. p.m. v.s. D.C. N.Y. vs. co. Mr. "
        "Mrs. Ms. Dr. Prof. St. Jr. Inc. Ltd. Co. Corp. Bros. Mt. Gen. Gov. Rep. Sen. Rev. Jan. Feb. "
        'Mar. Apr. Jun. Jul. Aug. Sep. Sept. Oct. Nov. Dec. \\")'
    )
) | {c + "." for c in "abcdefghijklmnopqrstuvwxyzäöü"}
_PLAIN = regex.compile(r"\p{L}+|\p{N}+")
_CACHE: dict[str, list[str]] = {}


def _special(s: str) -> list[str] | None:
    if s in _WHOLE:
        return [s]
    m = _CONTRACTION.fullmatch(s)
    # spaCy lists lower-case and capitalised forms only ("ID" is not "I" + "D").
    if m and s.lower() not in _NOT_CONTRACTED and (s.islower() or s[1:].islower()):
        return [g for g in m.groups() if g]
    return None


def _split_chunk(s: str) -> list[str]:
    """spaCy's Tokenizer._split_affixes + _attach_tokens on one whitespace-free chunk."""
    out: list[str] = []
    suffixes: list[str] = []
    last = -1
    while s and len(s) != last and not _special(s):
        last = len(s)
        m = _PREFIX.search(s)
        pre = m.end() if m else 0
        if pre and s[pre:] and _special(s[pre:]):
            out.append(s[:pre])
            s = s[pre:]
            break
        m = _SUFFIX.search(s[pre:])
        suf = m.end() - m.start() if m else 0
        if suf and s[:-suf] and _special(s[:-suf]):
            suffixes.append(s[-suf:])
            s = s[:-suf]
            break
        if pre and suf and pre + suf <= len(s):
            out.append(s[:pre])
            suffixes.append(s[-suf:])
            s = s[pre:-suf]
        elif pre:
            out.append(s[:pre])
            s = s[pre:]
        elif suf:
            suffixes.append(s[-suf:])
            s = s[:-suf]
    if s:
        special = _special(s)
        if special:
            out += special
        elif _URL.match(s):
            out.append(s)
        else:
            start = 0
            for m in _INFIX.finditer(s):
                a, b = m.span()
                if a == 0:
                    continue
                out += [s[start:a]] if a != start else []
                out += [s[a:b]] if a != b else []
                start = b
            out += [s[start:]] if s[start:] else []
    out += reversed(suffixes)
    # spaCy's special-case matcher then merges affix tokens that spell an exception ("):").
    i = 0
    while i < len(out) - 1:
        for k in (3, 2):
            if i + k <= len(out) and "".join(out[i : i + k]) in _WHOLE:
                out[i : i + k] = ["".join(out[i : i + k])]
                break
        i += 1
    return out


def english_words(text: str) -> list[str]:
    """spaCy-compatible English tokens, punctuation tokens included (whitespace dropped)."""
    out: list[str] = []
    for chunk in text.split():
        toks = _CACHE.get(chunk)
        if toks is None:
            toks = (_special(chunk) or [chunk]) if _PLAIN.fullmatch(chunk) else _split_chunk(chunk)
            if len(_CACHE) > 200_000:  # chunks repeat a lot (spaCy caches them too)
                _CACHE.clear()
            _CACHE[chunk] = toks
        out += toks
    return out


# datatrove's PUNCTUATION_SET: a token made only of these is a "symbol", not a word.
_SYMBOL = regex.compile(
    r"[!/—”:％１〈&(、━\\【#%「」，】；+^\]~“《„';’{|∶´\[=\-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    r"\x00-\x08\x0b-\x1f\x7f-\x9f\p{Terminal_Punctuation}]+"
)


@dataclass
class GopherQuality:
    """Rae et al. 2021, appendix A, table A1 (the published thresholds are the defaults)."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3
    max_mean_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    cjk_threshold: float = 0.3

    def __call__(self, doc: dict) -> str | None:
        text = doc["text"]
        cjk = cjk_fraction(text) >= self.cjk_threshold
        if cjk:
            tokens = words = words_of(text)
        else:
            # As datatrove: spaCy tokens; punctuation tokens are not words for the length rules
            # but stay in the denominators of the symbol and alphabetic ratios.
            tokens = english_words(text)
            words = [w for w in tokens if not _SYMBOL.fullmatch(w)]
        n = len(words)
        if n < self.min_words:
            return "gopher_short_document"
        if n > self.max_words:
            return "gopher_long_document"
        # Mean word length says nothing about CJK text, where a "word" here is one character.
        if not cjk:
            mean = sum(map(len, words)) / n
            if mean < self.min_mean_word_length:
                return "gopher_below_avg_word_length"
            if mean > self.max_mean_word_length:
                return "gopher_above_avg_word_length"
        # "for either the hash symbol or the ellipsis" (the paper): two separate ratios.
        hashes, ellipses = text.count("#"), text.count("...") + text.count("…")
        if max(hashes, ellipses) / len(tokens) > self.max_symbol_word_ratio:
            return "gopher_too_many_symbols"
        lines = text.splitlines()
        if lines:
            bullets = sum(line.lstrip().startswith(("•", "-")) for line in lines)
            if bullets / len(lines) > self.max_bullet_lines_ratio:
                return "gopher_too_many_bullets"
            ellipsis = sum(line.rstrip().endswith(("...", "…")) for line in lines)
            if ellipsis / len(lines) > self.max_ellipsis_lines_ratio:
                return "gopher_too_many_end_ellipsis"
        alpha = sum(any(c.isalpha() for c in w) for w in tokens)
        if alpha / len(tokens) < self.min_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        # "at least two of the following English words": distinct words, as datatrove (which
        # also matches case-sensitively; the paper does not say).
        stops = STOP_WORDS_ZH if cjk else STOP_WORDS
        if len(stops.intersection(w.lower() for w in words)) < self.min_stop_words:
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


@dataclass
class GopherRepetition:
    """Rae et al. 2021, table A1: duplicate lines/paragraphs and repeated n-grams, as fractions
    of lines, paragraphs or characters. N-grams are hashed to integers with numpy. In CJK text
    an n-gram counts characters, so n is doubled (two characters ~ one word)."""

    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: Sequence[Sequence[float]] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: Sequence[Sequence[float]] = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10),
    )  # fmt: skip
    cjk_threshold: float = 0.3

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
        cjk = cjk_fraction(text) >= self.cjk_threshold
        words = words_of(text) if cjk else english_words(text)
        if not words:
            return None
        scale = 2 if cjk else 1
        ids, lengths = _word_ids(words)
        for n, frac in self.top_n_grams:
            n = int(n) * scale
            if len(words) < n:
                continue
            # Characters of the most frequent n-gram times its count (words joined by spaces).
            grams = _ngram_hashes(ids, n)
            _, first, counts = np.unique(grams, return_index=True, return_counts=True)
            # Ties: the n-gram seen first, as datatrove's Counter.most_common(1).
            best = first[counts == counts.max()].min()
            top_chars = int(_ngram_lengths(lengths, n)[best]) * int(counts.max())
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


@dataclass
class C4Filter:
    """Raffel et al. 2020 §2.2 (C4): keep lines ending in terminal punctuation with at least 3
    words, drop lines mentioning javascript or cookie/terms boilerplate, drop documents with
    "lorem ipsum" or a curly bracket, or fewer than 3 sentences (5 in datatrove's default)."""

    POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies")

    min_words_per_line: int = 3
    min_sentences: int = 5
    max_word_length: int = 1000
    drop_curly_bracket: bool = True
    cjk_threshold: float = 0.3

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


@dataclass
class FineWebFilter:
    """Penedo et al. 2024 (FineWeb) rules, datatrove's thresholds: share of lines ending in
    punctuation >= 0.12, share of lines under 30 characters <= 0.67, characters in duplicated
    lines <= 1%, newlines per word <= 0.3. CJK lines are short in characters, so the short-line
    length is 10 characters there."""

    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    short_line_length: int = 30
    short_line_length_cjk: int = 10
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3
    cjk_threshold: float = 0.3

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
