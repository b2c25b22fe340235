"""Perplexity filter's n-gram model against the interpolation formula written out; the
classifier separates reference text from shuffled text."""

import math
import random

import numpy as np

from lmforge.data.quality_model import NgramLM, QualityClassifier, reference_texts


def test_bigram_probability_matches_formula():
    lm = NgramLM(["a b a c", "a b"], order=2, discount=0.75)
    # tokens: a b a c a b -> unigram counts a3 b2 c1, N=6, V=3 ; bigram contexts: a->{b:2, c:1}
    uni = {w: (c + 1) / (6 + 3 + 1) for w, c in {"a": 3, "b": 2, "c": 1}.items()}
    # P(b | a) = (2 - .75)/3 + .75 * 2/3 * P(b)
    expected = [uni["a"], (2 - 0.75) / 3 + 0.75 * 2 / 3 * uni["b"]]
    assert np.allclose(np.exp(lm.log_probs("a b")), expected)
    # unseen context "c": back off to the unigram
    assert math.isclose(float(np.exp(lm.log_probs("c a")[1])), uni["a"])


def test_classifier_and_perplexity_rank_real_text_above_shuffled():
    texts = reference_texts(["default"], 400)
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(t.split(), len(t.split()))) for t in texts]
    model = QualityClassifier(texts[:300], shuffled[:300])
    real, fake = model.score(texts[300:]), model.score(shuffled[300:])
    assert (real > fake).mean() > 0.8  # one-line docstrings shuffle into near-identical text
    assert real.mean() > fake.mean() + 0.15
    lm = NgramLM(texts[:300])
    better = [
        lm.perplexity(a) < lm.perplexity(b)
        for a, b in zip(texts[300:], shuffled[300:])
        if a.strip()
    ]
    assert np.mean(better) > 0.8
