"""Exact, line/span and near-duplicate de-duplication, decontamination and mixture, checked
against counts worked out by hand."""

import json

import numpy as np
import pytest

from lmforge.data.decontaminate import Decontaminator
from lmforge.data.dedup import ExactDedup, LineDedup, MinHashDedup, normalised_hash
from lmforge.data.mixture import Mixture


def doc(text: str, id: str = "d", source: str = "s") -> dict:
    return {"text": text, "id": id, "source": source, "meta": {}}


def run_global(step, shards: list[list[dict]]) -> list[list[dict]]:
    """collect -> decide -> apply, as the pipeline does, over in-memory shards."""
    collected = []
    for shard in shards:
        c = step.collector()
        for d in shard:
            c.add(d)
        collected.append(c.result())
    decisions = step.decide(collected)
    out = []
    for shard, decision in zip(shards, decisions):
        kept = []
        for i, d in enumerate(shard):
            kept += step.apply(d, i, decision)[0]
        out.append(kept)
    return out


def test_exact_dedup_normalises_and_keeps_first_across_shards():
    assert normalised_hash("Hello   World\n") == normalised_hash("hello world")
    assert normalised_hash("ｈｅｌｌｏ") == normalised_hash("hello")  # NFKC full-width
    shards = [[doc("A text", "1"), doc("B text", "2")], [doc("a  TEXT", "3"), doc("C", "4")]]
    out = run_global(ExactDedup(), shards)
    assert [[d["id"] for d in s] for s in out] == [["1", "2"], ["4"]]


def test_line_dedup_removes_repeated_boilerplate_lines_keeping_first():
    footer = "Copyright 2024 Example Corp. All rights reserved."
    shards = [
        [doc(f"Article one has its own body text here.\n{footer}", "1")],
        [doc(f"Article two talks about other things.\n{footer}", "2"), doc(footer, "3")],
    ]
    out = run_global(LineDedup(unit="line", min_chars=20), shards)
    assert out[0][0]["text"].endswith(footer)
    assert out[1][0]["text"] == "Article two talks about other things."
    assert len(out[1]) == 1  # document 3 was only the footer: dropped


def test_span_dedup_uses_three_sentence_spans():
    spans = "One is here. Two is here. Three is here. "
    a = doc(spans + "Unique to A. More of A. End of A.", "a")
    b = doc(spans + "Unique to B now. More of B now. End of B now.", "b")
    out = run_global(LineDedup(unit="span", min_chars=5), [[a, b]])
    assert out[0][0]["text"].startswith("One is here.")
    assert out[0][1]["text"] == "Unique to B now. More of B now. End of B now."


def test_minhash_dedup_step_across_shards():
    base = " ".join(f"word{i}" for i in range(200))
    near = base.replace("word50 ", "changed ")
    other = " ".join(f"other{i}" for i in range(200))
    out = run_global(MinHashDedup(), [[doc(base, "1")], [doc(other, "2"), doc(near, "3")]])
    assert [[d["id"] for d in s] for s in out] == [["1"], ["2"]]


def test_decontamination_cuts_13_gram_overlap_like_gpt3(tmp_path):
    question = "what is the boiling point of water at sea level in degrees celsius on a normal day"
    evalfile = tmp_path / "eval.jsonl"
    evalfile.write_text(json.dumps({"question": question, "answer": "100"}) + "\n")
    step = Decontaminator(tasks=[str(evalfile)], window=10)
    before, after = "x " * 100, " y" * 100
    d = doc(before + question.upper() + after)
    assert step(d) is None
    assert "boiling" not in d["text"] and d["text"].startswith("x x") and d["text"].endswith("y y")
    assert d["meta"]["contaminated_ngrams"] == len(question.split()) - 13 + 1
    twelve = " ".join(question.split()[:12])  # 12 words: below n, not a hit
    assert step(doc(twelve)) is None
    assert Decontaminator(tasks=[str(evalfile)], action="drop")(doc(question)) == "contaminated"


def test_decontamination_accepts_lmforge_tasks():
    step = Decontaminator(tasks=["reading_mc"], n=8)
    assert step.items > 0 and len(step.grams) > 0
    with pytest.raises(Exception, match="unknown task"):
        Decontaminator(tasks=["no_such_task"])


def test_mixture_hits_target_proportions_with_epoch_caps():
    shards = [
        [doc("a" * 10, f"a{i}", "web") for i in range(1000)],
        [doc("b" * 10, f"b{i}", "books") for i in range(100)],
    ]
    # books may repeat twice: total = min(1 * 10000 / 0.5, 2 * 1000 / 0.5) = 4000 characters.
    step = Mixture(weights={"web": 1, "books": 1}, unit="characters", max_epochs={"books": 2})
    out = run_global(step, shards)
    web = sum(len(d["text"]) for d in out[0])
    books = sum(len(d["text"]) for d in out[1])
    assert books == 2000  # every book exactly twice (rate 2.0)
    assert abs(web - 2000) < 300  # sampled at rate 0.2: binomial, sd ~ 126 characters
    assert len({d["id"] for d in out[1]}) == 200
    assert step.plan["rates"]["books"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no data for source"):
        run_global(Mixture(weights={"web": 1, "news": 1}), shards)
    assert np.isclose(sum(Mixture(weights={"x": 2, "y": 6}).weights.values()), 1)
