"""Self-instruct: ROUGE-L against the formula, and the filter keeps only novel, sane tasks."""

import pytest

from lmforge.adapt.self_instruct import parse, rouge_l, self_instruct


def test_rouge_l_formula():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4 tokens.
    p, r = 4 / 6, 4 / 6
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(
        2 * p * r / (p + r)
    )
    assert rouge_l("a b", "c d") == 0.0 and rouge_l("x y z", "x y z") == 1.0


def test_self_instruct_filters_similar_and_bad_proposals():
    seeds = [{"instruction": "Sort these numbers from smallest to largest: 3, 1, 2.",
              "output": "1, 2, 3"}]  # fmt: skip
    proposals = iter([
        "Sort these numbers from smallest to largest: 9, 1, 5.\nOutput: 1, 5, 9",  # similar
        "Describe the picture of a cat.\nOutput: A cat.",  # blocklist
        "Hi\nOutput: x",  # too short
        "no output marker here",  # unparsable
        "Reverse the letters of the word 'stone'.\nOutput: enots\nTask 3: more",
        "Name the capital city of France.\nOutput: Paris",
    ])  # fmt: skip
    new, rejected = self_instruct(seeds, lambda prompt: next(proposals), 2, max_tries=6)
    assert [t["instruction"] for t in new] == [
        "Reverse the letters of the word 'stone'.",
        "Name the capital city of France.",
    ]
    assert new[0]["output"] == "enots"
    assert rejected == {"unparsable": 1, "similar": 1, "length": 1, "blocklist": 1,
                        "empty output": 0, "starts with punctuation": 0}  # fmt: skip
    assert parse(" Task text\nOutput: y") == ("Task text", "y")
