"""Preference data: readers with errors naming the problem, ranked lists as InstructGPT pairs,
verifiable pairs from disjoint splits, and Bradley-Terry / Elo summaries."""

import json
import math
import random

import pytest

from lmforge.adapt.preference import (
    HARMFUL_ACTIONS,
    PreferenceDataConfig,
    VerifiablePrompt,
    bradley_terry,
    elo,
    harmful_prompts,
    is_refusal,
    load_pairs,
    ranking_summary,
    read_pairs,
    verifiable_pairs,
    verifiable_prompts,
    wrong_answer,
)
from lmforge.data import synthetic
from lmforge.errors import CorpusError


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pairwise_and_ranked_records(tmp_path):
    path = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q1", "chosen": "good", "rejected": "bad", "margin": 2},
            {
                "prompt": "q2",
                "responses": ["a", {"text": "b", "source": "m2"}, "c"],
                "ranking": [1, 2, 0],
            },
            {"prompt": "q3", "responses": ["x", "y", "z"], "scores": [1.0, 3.0, 1.0]},
        ],
    )
    pairs = read_pairs(path)
    assert (pairs[0].chosen, pairs[0].rejected, pairs[0].margin) == ("good", "bad", 2)
    ranked = pairs[1:4]
    # K = 3 responses ranked b > c > a: all C(3, 2) = 3 pairs, each weighted 1/3.
    assert [(p.chosen, p.rejected) for p in ranked] == [("b", "c"), ("b", "a"), ("c", "a")]
    assert all(p.weight == pytest.approx(1 / 3) for p in ranked)
    assert ranked[0].sources == ("m2", "#2")
    # Scores: y beats x and z; the tie x = z gives no pair.
    assert sorted((p.chosen, p.rejected) for p in pairs[4:]) == [("y", "x"), ("y", "z")]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "q", "chosen": "  ", "rejected": "no"}, "'chosen' is empty"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
        ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}, "every response index"),
        ({"prompt": "q", "responses": ["a", "a"], "ranking": [0, 1]}, "identical"),
    ],
)
def test_bad_pairs_name_line_and_problem(tmp_path, record, message):
    path = _write(
        tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record]
    )
    with pytest.raises(CorpusError, match=message) as e:
        read_pairs(path)
    assert f"{path}:2" in str(e.value)


def test_verifiable_pairs_train_and_test_are_disjoint():
    tasks = ["comparison", "sorting", "reversing", "arithmetic"]
    train = verifiable_pairs(tasks, 30, split="train")
    test = verifiable_pairs(tasks, 10, split="test")
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert {p.kind for p in train} == {"correct", "concise", "refusal"}
    for p in train:
        assert p.chosen != p.rejected
        if p.kind == "refusal":
            assert is_refusal(p.chosen) and not is_refusal(p.rejected)
    # Held-out harmful requests come from actions never seen in training.
    train_actions = {a for a in HARMFUL_ACTIONS for p in harmful_prompts("train") if a in p}
    test_actions = {a for a in HARMFUL_ACTIONS for p in harmful_prompts("test") if a in p}
    assert train_actions and test_actions and not train_actions & test_actions


def test_the_verifier_agrees_with_the_pairs():
    rng = random.Random(0)
    for task in synthetic.INSTRUCTION_TASKS["en"]:
        for item in synthetic.generate(task, 20, split="train"):
            prompt = VerifiablePrompt(item.question, "task", item.answer, task)
            assert prompt.reward(item.answer) == 1.0 and prompt.reward(item.solution) == 1.0
            assert prompt.reward(wrong_answer(item, rng)) == 0.0
    [p] = verifiable_prompts([], 0, split="test", harmful=1)
    assert p.reward("I can't help with that.") == 1.0 and p.reward("Sure! First, ...") == 0.0


def test_files_are_split_by_prompt(tmp_path):
    records = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(200)]
    path = _write(tmp_path / "p.jsonl", records + records)  # every prompt twice
    train, held = load_pairs(PreferenceDataConfig(files=[str(path)], eval_fraction=0.2))
    assert len(train) + len(held) == 400 and 40 < len(held) < 120
    assert not {p.prompt for p in train} & {p.prompt for p in held}


def test_bradley_terry_is_the_likelihood_maximum():
    games = [("a", "b")] * 6 + [("b", "a")] * 2 + [("b", "c")] * 5 + [("c", "b")] * 3
    games += [("a", "c")] * 4 + [("c", "a")]
    s = bradley_terry(games, iters=2000)
    assert s["a"] > s["b"] > s["c"]

    def loglik(x):  # the fitted objective: the games, and half a game won and lost vs strength 0
        ll = sum(math.log(1 / (1 + math.exp(x[lo] - x[w]))) for w, lo in games)
        return ll + sum(
            0.5 * math.log(1 / (1 + math.exp(-v))) + 0.5 * math.log(1 / (1 + math.exp(v)))
            for v in x.values()
        )

    best = loglik(s)
    for player in s:
        for step in (-1e-3, 1e-3):
            assert loglik({**s, player: s[player] + step}) <= best + 1e-9


def test_elo_updates_by_hand_and_summary():
    r = elo([("a", "b")])
    assert r == {"a": 1016.0, "b": 984.0}  # expected 0.5 each: 32 * 0.5 moves
    r = elo([("a", "b"), ("a", "b")])
    e = 1 / (1 + 10 ** ((984 - 1016) / 400))
    assert r["a"] == pytest.approx(1016 + 32 * (1 - e))
    from lmforge.adapt.preference import ranked_pairs

    pairs = ranked_pairs(
        "q", [{"text": "x", "source": "big"}, {"text": "y", "source": "small"}], [0, 1], "test"
    )
    [top, bottom] = ranking_summary(pairs)
    assert (top["source"], top["wins"], bottom["losses"]) == ("big", 1, 1)
