"""Heuristic quality filters: each rule fires on a document built to trip it and only on it."""

import random
from collections import Counter

import pytest

from lmforge.data.filters import (
    Blocklist,
    C4Filter,
    FineWebFilter,
    GopherQuality,
    GopherRepetition,
    cjk_fraction,
    trie_pattern,
)

GOOD = (
    "The committee met on Tuesday to review the budget for the coming year. Members agreed "
    "that the library should have longer opening hours, and that the park needs new benches. "
    "After a short debate, they voted to fund both projects with the money saved on energy. "
    "The mayor thanked the volunteers who had collected signatures over the summer months."
)
ZH = (
    "数据质量是训练大语言模型的第一要素。我们在预训练之前需要过滤低质量的文本，去除重复的内容，"
    "并且删除个人隐私信息。研究者发现，经过清洗的数据可以让模型在相同的计算量下取得更好的效果。"
    "这也是为什么许多团队愿意在数据处理上投入大量的时间和精力。"
)


def doc(text: str) -> dict:
    return {"text": text, "id": "d", "source": "t", "meta": {}}


def test_gopher_quality_keeps_prose_and_each_rule_fires():
    g = GopherQuality()
    assert g(doc(GOOD)) is None
    assert g(doc("too few words here.")) == "gopher_short_document"
    assert g(doc(" ".join(["a"] * 60))) == "gopher_below_avg_word_length"
    assert g(doc(" ".join(["extraordinarily"] * 60))) == "gopher_above_avg_word_length"
    assert g(doc(GOOD + " #tag" * 10)) == "gopher_too_many_symbols"
    bullets = "\n".join(f"- item number {i} of the list and the rest" for i in range(20))
    assert g(doc(bullets)) == "gopher_too_many_bullets"
    ell = "\n".join(f"this is line {i} of the story and it trails off..." for i in range(12))
    assert g(doc(ell)) == "gopher_too_many_end_ellipsis"  # 12 "..." per 120 words: ratio 0.1
    assert (
        g(doc(" ".join(["123"] * 30 + ["word", "the", "of"] * 10)))
        == "gopher_below_alpha_threshold"
    )
    no_stops = " ".join(["apple", "banana", "cherry", "grape"] * 15)
    assert g(doc(no_stops)) == "gopher_enough_stop_words"


def test_gopher_quality_is_cjk_aware():
    g = GopherQuality()
    assert cjk_fraction(ZH) > 0.9
    # Whitespace splitting would see a handful of "words"; characters make it a real document.
    assert g(doc(ZH)) is None
    assert g(doc("数据质量很重要。")) == "gopher_short_document"
    assert g(doc("苹果香蕉葡萄橙子" * 10)) == "gopher_enough_stop_words"


def _top_ngram_frac(text: str, n: int) -> float:
    """Brute force of Gopher's top n-gram character fraction (words joined by spaces)."""
    from lmforge.data.filters import english_words

    w = english_words(text)
    grams = Counter(" ".join(w[i : i + n]) for i in range(len(w) - n + 1))
    gram, count = grams.most_common(1)[0]  # ties: the first seen, as datatrove
    return len(gram) * count / len(text)


def test_gopher_repetition_rules():
    r = GopherRepetition()
    assert r(doc(GOOD)) is None
    assert r(doc(ZH)) is None
    lines = "\n".join(["same line repeated here"] * 4 + ["one", "two", "three"])
    assert r(doc(lines)) == "gopher_dup_line_frac"
    paras = "\n\n".join(["a paragraph that repeats"] * 3 + ["x", "y", "z"])
    assert r(doc(paras)) == "gopher_dup_para_frac"
    spam = GOOD + " buy now" * 30
    assert _top_ngram_frac(spam, 2) > 0.2
    assert r(doc(spam)) == "gopher_top_2_gram"
    # The vectorised top n-gram rule agrees with the brute force on random repetitive texts.
    rng = random.Random(0)
    for _ in range(40):
        text = " ".join(rng.choice(["red", "green", "blue", "sky", "sea"]) for _ in range(60))
        for n, frac in ((2, 0.2), (3, 0.18), (4, 0.16)):
            only = GopherRepetition(
                dup_line_frac=1, dup_para_frac=1, dup_line_char_frac=1, dup_para_char_frac=1,
                top_n_grams=[(n, frac)], dup_n_grams=[],
            )  # fmt: skip
            assert (only(doc(text)) is not None) == (_top_ngram_frac(text, n) > frac)
    copy = GOOD + " " + GOOD.split(". ")[0] + " " + GOOD.split(". ")[0]
    assert r(doc(copy)).startswith("gopher_duplicated_")
    assert r(doc(ZH * 3)) == "gopher_top_4_gram" or r(doc(ZH * 3)).startswith("gopher_")


def test_c4_rules_edit_lines_and_drop_documents():
    c4 = C4Filter(min_sentences=2)
    d = doc(
        "Home | About | Contact\n"
        "This site uses cookies to improve your experience.\n"
        "Please enable javascript to view this page properly.\n"
        "The river flooded the town after three days of rain.\n"
        "Residents were moved to the school gym for the night.\n"
        "Short line.\n"
    )
    assert c4(d) is None
    assert d["text"] == (
        "The river flooded the town after three days of rain.\n"
        "Residents were moved to the school gym for the night."
    )
    assert c4(doc("lorem ipsum dolor sit amet.")) == "c4_lorem_ipsum"
    assert c4(doc("function f() { return 1; }")) == "c4_curly_bracket"
    assert c4(doc("One sentence only here.")) == "c4_too_few_sentences"
    zh = doc("今天下雨了，河水上涨。\n居民被转移到学校体育馆过夜。\n导航")
    assert c4(zh) is None and "导航" not in zh["text"]


def test_fineweb_rules():
    f = FineWebFilter()
    assert f(doc(GOOD)) is None
    assert f(doc("\n".join(f"menu item {i}" for i in range(20)))) == "fineweb_line_punct_ratio"
    short = "\n".join(["Yes.", "No.", "Maybe.", GOOD])
    assert f(doc(short)) == "fineweb_short_line_ratio"
    dup = "\n".join(
        [GOOD, "A repeated sentence that appears twice.", "A repeated sentence that appears twice."]
    )
    assert f(doc(dup)) == "fineweb_char_dup_ratio"
    assert f(doc(ZH)) is None
    assert (
        f(doc("\n".join(["短句。"] * 2 + ["又一个短句。", "还有。"]))) == "fineweb_short_line_ratio"
    )


def test_blocklist_whole_words_and_cjk():
    b = Blocklist(words=["casino", "free money", "赌博"])
    assert b(doc("Visit the casino tonight")) == "blocklist"
    assert b(doc("the casinos are closed")) is None  # whole words only for Latin script
    assert b(doc("Get FREE   money")) is None  # phrases match as written
    assert b(doc("get free money now")) == "blocklist"
    assert b(doc("网上赌博是违法的")) == "blocklist"
    with pytest.raises(ValueError, match="blocklist"):
        Blocklist()


def test_trie_pattern_matches_exactly_the_words():
    import re

    words = ["car", "cart", "care", "dog"]
    pattern = re.compile(rf"^(?:{trie_pattern(words)})$")
    for w in words:
        assert pattern.match(w)
    for w in ["ca", "carts", "do", "cat"]:
        assert not pattern.match(w)


def test_english_words_count_as_datatrove_spacy_tokenizer():
    """Hand-checked against datatrove 0.10.1's split_into_words (spaCy 3 blank "en")."""
    from lmforge.data.filters import english_words

    assert english_words("Don't stop, e.g. at 5km... (really)!") == [
        "Do", "n't", "stop", ",", "e.g.", "at", "5", "km", "...", "(", "really", ")", "!",
    ]  # fmt: skip
    assert english_words("def f(x):\n    return x[1:] # U.S.A. state-of-the-art") == [
        "def", "f(x", "):", "return", "x[1", ":]", "#", "U.S.A.", "state", "-", "of", "-",
        "the", "-", "art",
    ]  # fmt: skip
    assert english_words("ID I'm they're cannot https://example.com/a.") == [
        "ID", "I", "'m", "they", "'re", "can", "not", "https://example.com/a", ".",
    ]  # fmt: skip
    # Punctuation tokens are not words for the length rules but count in the alphabetic ratio:
    # 50 words + 50 "," tokens is 100 tokens with 50% alphabetic, below Gopher's 80%.
    g = GopherQuality()
    assert g(doc(", ".join(["the", "of", "cat", "dog", "bird"] * 10))) == (
        "gopher_below_alpha_threshold"
    )
    assert g(doc(" ".join(["the", "of", "cat", "dog", "bird"] * 10))) is None
    # Stop words are distinct words ("at least two of": the paper); "the the" is one.
    assert g(doc(" ".join(["the", "cat", "dog", "bird", "fish"] * 10))) == (
        "gopher_enough_stop_words"
    )
