"""Language ID accuracy on held-out sentences. Test set: 300 Chinese sentences from the seed notes
(tests/fixtures/zh_sentences.txt, sentences with >= 8 Han characters making >= 60% of letters)
and the first sentence of 300 English docstrings of Python's standard library. Neither was used
to train fastText's lid.176."""

from pathlib import Path

import regex

from lmforge.data.default_corpus import default_documents
from lmforge.data.langid import LanguageFilter, identify

FIXTURE = Path(__file__).parent.parent / "fixtures" / "zh_sentences.txt"


def _english_sentences(n: int) -> list[str]:
    out = []
    for d in default_documents():
        if d["source"] != "python-stdlib":
            continue
        first = regex.split(r"(?<=[.!?])\s", d["text"].strip(), maxsplit=1)[0]
        if len(first.split()) >= 5 and first.isascii():
            out.append(first)
        if len(out) == n:
            return out
    return out


def test_english_and_chinese_accuracy_at_least_98_percent():
    zh = FIXTURE.read_text(encoding="utf-8").splitlines()
    en = _english_sentences(300)
    assert len(zh) == 300 and len(en) == 300
    zh_ok = sum(identify(s)[0] == "zh" for s in zh) / len(zh)
    en_ok = sum(identify(s)[0] == "en" for s in en) / len(en)
    assert zh_ok >= 0.98, zh_ok
    assert en_ok >= 0.98, en_ok


def test_filter_annotates_and_drops():
    f = LanguageFilter(languages=["zh"], min_score=0.5)
    d = {"text": "This sentence is written in English.", "meta": {}}
    assert f(d) == "language_en"
    assert d["meta"]["language"] == "en" and 0.5 < d["meta"]["language_score"] <= 1
    d = {"text": "这句话是用中文写的，用来测试语言识别。", "meta": {}}
    assert f(d) is None and d["meta"]["language"] == "zh"


def test_kana_free_rule_keeps_japanese_and_cantonese():
    assert identify("これは日本語の文です。")[0] == "ja"
    assert identify("我哋今日去咗飲茶，好開心呀。")[0] == "yue"
