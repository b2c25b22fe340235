"""Metric formulas written out: acc/acc_norm, exact-match normalisation, SQuAD F1, GSM8K answer
extraction, standard errors, perplexity aggregates and self-consistency voting."""

import math

import pytest

from lmforge.evaluation import metrics
from lmforge.infer.prompting import majority_vote


def test_acc_norm_divides_by_choice_characters():
    lls, choices = [-4.0, -5.0, -9.0], ["a", "bbbbbbbb", "cc"]
    # acc: argmax(-4, -5, -9) = 0; acc_norm: argmax(-4/1, -5/8, -9/2) = argmax(-4, -0.625, -4.5) = 1
    s = metrics.multiple_choice_scores(lls, choices, gold=1)
    assert (s["pred"], s["pred_norm"], s["acc"], s["acc_norm"]) == (0, 1, 0.0, 1.0)
    # Ties go to the first choice, as np.argmax; several gold choices (BIG-bench) all count.
    assert metrics.multiple_choice_scores([-1.0, -1.0], ["x", "y"], gold=[1])["pred"] == 0
    assert metrics.multiple_choice_scores([-2.0, -1.0, -3.0], ["x", "y", "z"], [0, 1])["acc"] == 1


def test_mean_stderr_is_sample_std_over_sqrt_n():
    values = [1.0, 0.0, 1.0, 1.0]
    mu = 0.75
    sample_std = math.sqrt(sum((v - mu) ** 2 for v in values) / 3)  # = 0.5
    assert metrics.mean_stderr(values) == pytest.approx(sample_std / 2) == pytest.approx(0.25)
    assert math.isnan(metrics.mean_stderr([1.0]))


def test_exact_match_normalisation_options():
    N = metrics.Normalization
    assert metrics.exact_match("Paris", "paris", N()) == 0
    assert metrics.exact_match("Paris", "paris", N(ignore_case=True)) == 1
    assert metrics.exact_match("paris!", "paris", N(ignore_punctuation=True)) == 1
    assert (
        metrics.exact_match("the  cat", "cat", N(ignore_articles=True, ignore_whitespace=True)) == 1
    )
    assert metrics.exact_match(" cat ", "cat", N()) == 0
    assert metrics.exact_match(" cat ", "cat", N(ignore_whitespace=True)) == 1
    # lm-eval's gsm8k options: "$1,000." and "1000" match once "," "$" and a final "." go.
    gsm = N(ignore_case=True, regexes_to_ignore=(",", r"\$", "(?s).*#### ", r"\.$"))
    assert metrics.exact_match("$1,000.", "1000", gsm) == 1
    assert metrics.exact_match("so 4+4=8\n#### 8", "8", gsm) == 1
    assert metrics.exact_match("7", ["8", "7"], N()) == 1  # any reference


def test_squad_token_f1():
    # pred -> [cat, sat]; gold -> [cat, sat, down]; overlap 2: P = 1, R = 2/3, F1 = 0.8
    assert metrics.token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert metrics.token_f1("dog", "cat") == 0.0
    assert metrics.token_f1("cat", ["dog", "the cat"]) == 1.0


def test_strict_and_flexible_extraction():
    text = "5 + 3 = 8 apples.\n#### 8"
    assert metrics.extract_strict(text) == "8"
    assert metrics.extract_strict("The answer is 42.") == metrics.INVALID
    # flexible: the last number-like span; "42." keeps its dot, which exact match's "\.$" drops
    assert metrics.extract_flexible("The answer is 42.") == "42."
    assert metrics.extract_flexible("I have 3 apples and 12 pears") == "12"
    assert metrics.extract_flexible("I have 3 apples and 2 pears") == "2"
    assert metrics.extract_flexible("no digits") == metrics.INVALID
    assert metrics.extract_answer("A: (b)", r"\(([a-d])\)") == "b"


def test_perplexity_aggregates():
    lls, toks, words, nbytes = [-10.0, -20.0], [5, 10], [2, 4], [12, 24]
    out = metrics.perplexity_aggregates(lls, toks, words, nbytes)
    assert out["token_perplexity"] == pytest.approx(math.exp(30 / 15))
    assert out["word_perplexity"] == pytest.approx(math.exp(30 / 6))
    assert out["byte_perplexity"] == pytest.approx(math.exp(30 / 36))
    assert out["bits_per_byte"] == pytest.approx(30 / 36 / math.log(2))


def test_majority_vote():
    assert majority_vote(["3", "4", "4", "3", "5"]) == "3"  # tie: first seen
    assert majority_vote(["[invalid]", "[invalid]", "7"]) == "7"
    assert majority_vote(["[invalid]"]) == "[invalid]"
