"""Answer extraction and self-consistency voting on fixed samples, and one engine batch of
sampled rationales."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.prompting import INVALID, extract_answer, self_consistency, vote
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_bpe


@pytest.mark.parametrize(
    "text,answer",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),  # GSM8K line wins over others
        ("#### 1,234", "1234"),
        ("She has 5 + 3 = 8. The answer is 8.", "8"),
        ("The answer is $12.50.", "12.50"),
        ("First 3, then 4, finally 9", "9"),  # the last number
        ("the final answer is: -3", "-3"),
        ("It costs 7.0 dollars", "7"),
        ("The answer is 5. Later I said 6.", "5"),
        ("no numbers here", INVALID),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_vote_on_fixed_samples():
    texts = ["... The answer is 12.", "#### 12", "so 13", "nothing", "The answer is 13."]
    v = vote(texts)
    # 12 and 13 tie with two votes each; the first one seen wins (majority_vote's rule).
    assert v.answer == "12" and v.share == pytest.approx(2 / 5)
    assert v.answers == ["12", "12", "13", INVALID, "13"]
    assert vote(["none", "nope"]).answer == INVALID
    assert vote(["8", "x 8", "The answer is 9."]).share == pytest.approx(2 / 3)


def test_self_consistency_samples_in_one_batch():
    tokenizer = train_bpe(["one two three four five six 1 2 3 4 5"] * 20, 300, min_frequency=1)
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        n_layers=1,
        n_heads=2,
        max_seq_len=64,
        init_std=0.3,
    )
    engine = Engine(Transformer(config).eval(), tokenizer, max_batch=5, max_context=64)
    prompt = tokenizer.encode("one two 1 2")
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    result, texts = self_consistency(engine, prompt, params, 5)
    assert len(texts) == 5 and len(set(texts)) > 1  # samples differ (seed + i each)
    assert engine.stats.peak_active == 5  # all five decoded together
    assert result.answers == [extract_answer(t) for t in texts]
    assert result.share == result.answers.count(result.answer) / 5
    with pytest.raises(LmforgeError, match="temperature"):
        self_consistency(engine, prompt, SamplingParams(temperature=0), 3)
