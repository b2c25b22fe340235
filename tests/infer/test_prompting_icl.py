"""In-context learning prompts: demonstration selection (random, BM25-similar, diverse, an
embedding hook), ordering, formats, and the chain-of-thought exemplar helpers."""

from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.infer import prompting
from lmforge.infer.prompting import PromptFormat, icl_prompt, select_demos

POOL = [
    ("How many apples does Ava have?", "4"),
    ("What colour is the sky?", "blue"),
    ("How many apples are in two baskets of apples?", "10"),
    ("Name a large ocean.", "Pacific"),
    ("How many pears and apples are there?", "7"),
]
QUERY = "How many apples does Ben have?"


def test_random_selection_is_seeded_and_without_repeats():
    a = select_demos(QUERY, POOL, 3, method="random", seed=1)
    assert a == select_demos(QUERY, POOL, 3, method="random", seed=1)
    assert len(set(a)) == 3 and set(a) <= set(POOL)
    draws = {tuple(select_demos(QUERY, POOL, 3, method="random", seed=s)) for s in range(10)}
    assert len(draws) > 1
    assert [POOL.index(d) for d in a] == sorted(POOL.index(d) for d in a)  # order="given"


def test_similar_selection_takes_the_bm25_nearest():
    picked = select_demos(QUERY, POOL, 2, method="similar", order="similar_last")
    # The apple questions overlap the query most; the closest one comes last, next to the query.
    assert picked == [POOL[2], POOL[0]]


def test_embedding_hook_replaces_bm25():
    vectors = {QUERY: [1.0, 0.0]} | {q: [0.0, 1.0] for q, _ in POOL}
    vectors["Name a large ocean."] = [1.0, 0.1]
    picked = select_demos(
        QUERY, POOL, 1, method="similar", embed=lambda texts: [vectors[t] for t in texts]
    )
    assert picked == [POOL[3]]


def test_diverse_selection_avoids_near_duplicates():
    pool = [("apples apples red", "a"), ("apples apples red!", "b"), ("apples green", "c")]
    similar = select_demos("red apples", pool, 2, method="similar")
    diverse = select_demos("red apples", pool, 2, method="diverse", diversity=0.7)
    assert similar == [pool[0], pool[1]]
    assert pool[2] in diverse and len(diverse) == 2


def test_order_random_permutes_the_selected_set():
    given = select_demos(QUERY, POOL, 5, method="similar", order="given")
    shuffled = select_demos(QUERY, POOL, 5, method="similar", order="random", seed=3)
    assert given == POOL and sorted(shuffled) == sorted(POOL) and shuffled != POOL


def test_icl_prompt_uses_description_and_delimiters():
    fmt = PromptFormat(
        description="Answer briefly.\n", target_delimiter=" => ", fewshot_delimiter="\n---\n"
    )
    text = icl_prompt("Q?", [("a", "1"), ("b", "2")], 2, fmt, method="random", order="given")
    assert text == "Answer briefly.\na => 1\n---\nb => 2\n---\nQ?"


def test_bad_selection_arguments():
    with pytest.raises(LmforgeError, match="only 5"):
        select_demos(QUERY, POOL, 6)
    with pytest.raises(LmforgeError, match="unknown selection"):
        select_demos(QUERY, POOL, 2, method="best")
    with pytest.raises(LmforgeError, match="unknown order"):
        select_demos(QUERY, POOL, 2, order="backwards")
    assert select_demos(QUERY, POOL, 0) == []


def test_cot_exemplars_and_calculator_annotations():
    q, target = prompting.cot_demo("2 + 2?", "2 + 2 = 4.", "4")
    assert (q, target) == ("Q: 2 + 2?", "2 + 2 = 4. The answer is 4.")
    text = prompting.build_prompt(
        prompting.cot_query("3 + 3?"), [(q, target)], prompting.COT_FORMAT
    )
    assert text == "Q: 2 + 2?\nA: 2 + 2 = 4. The answer is 4.\n\nQ: 3 + 3?"
    assert (
        prompting.cot_query("3 + 3?", zero_shot=True) == "Q: 3 + 3?\nA: Let's think step by step."
    )
    assert prompting.with_calculator_calls("3 bags of 5 is 3 * 5 = 15. Then 15 - 4 = 11.") == (
        "3 bags of 5 is <calc>3 * 5</calc><result>15</result>. "
        "Then <calc>15 - 4</calc><result>11</result>."
    )


def test_existing_builders_are_unchanged():
    fmt = PromptFormat("D\n", " ", "\n\n")
    assert prompting.build_prompt("q", [("a", "1")], fmt) == "D\na 1\n\nq"
    assert prompting.zero_shot_cot("Q: x\nA:", fmt) == "Q: x\nA: Let's think step by step."
