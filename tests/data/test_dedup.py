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
    if isinstance(step, MinHashDedup):  # verification reads each shard's texts again
        decisions = step.decide(collected, documents=lambda j: (d["text"] for d in shards[j]))
    else:
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


def test_minhash_dedup_step_verifies_candidates_across_shards():
    # 184 words, 4 substitutions 20 words apart: 5-gram Jaccard (180 - 20) / (180 + 20) = 0.8,
    # an LSH candidate at 14 x 8 but below the 0.85 threshold.
    words = [f"w{i}" for i in range(184)]
    near = list(words)
    for j in range(4):
        near[10 + 20 * j] = f"x{j}"
    shards = [[doc(" ".join(words), "1")], [doc(" ".join(near), "2")]]
    step = MinHashDedup()
    assert [[d["id"] for d in s] for s in run_global(step, shards)] == [["1"], ["2"]]
    assert step.plan == {"candidate_pairs": 1, "checked_pairs": 1, "rejected_pairs": 1}
    unverified = MinHashDedup(verify=False)
    assert [[d["id"] for d in s] for s in run_global(unverified, shards)] == [["1"], []]
    with pytest.raises(ValueError, match="verification needs the documents"):
        MinHashDedup().decide([{"keys": np.zeros((1, 14), np.uint64)}])
    with pytest.raises(ValueError, match="threshold"):
        MinHashDedup(threshold=1.5)


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


def test_mixture_counts_tokens_with_a_tokenizer_and_words_without(tmp_path):
    import tokenizers

    from lmforge.tokenizer import train_bpe

    prose = "the cat sat on the mat and the dog sat on the log " * 20
    train_bpe([prose] * 5, vocab_size=300).save(tmp_path / "tok")
    # "web" is prose the tokenizer knows (few tokens per word); "code" is hex strings it does
    # not (many tokens per word): the two units give different shares.
    web = [doc(prose[: 40 + i], f"w{i}", "web") for i in range(50)]
    code = [doc(" ".join(f"{i * 7919 + k:x}f9e" for k in range(8)), f"c{i}", "code")
            for i in range(50)]  # fmt: skip
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    tokens = {name: sum(len(reference.encode(d["text"]).ids) for d in docs)
              for name, docs in (("web", web), ("code", code))}  # fmt: skip
    words = {name: sum(len(d["text"].split()) for d in docs)
             for name, docs in (("web", web), ("code", code))}  # fmt: skip
    assert tokens["code"] / words["code"] > 2 * tokens["web"] / words["web"]

    by_tokens = Mixture(weights={"web": 1, "code": 1}, tokenizer=str(tmp_path / "tok"))
    run_global(by_tokens, [web, code])
    assert by_tokens.plan["unit"] == "tokens"
    assert by_tokens.plan["available"] == tokens
    # The file itself works too.
    assert Mixture(weights={"web": 1}, tokenizer=str(tmp_path / "tok" / "tokenizer.json")).size(
        web[0]
    ) == len(reference.encode(web[0]["text"]).ids)

    by_words = Mixture(weights={"web": 1, "code": 1})
    run_global(by_words, [web, code])
    assert by_words.plan["unit"] == "words" and by_words.plan["available"] == words

    with pytest.raises(ValueError, match="tokenizer .*missing does not exist"):
        Mixture(weights={"web": 1}, tokenizer=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="a tokenizer counts tokens"):
        Mixture(weights={"web": 1}, unit="documents", tokenizer=str(tmp_path / "tok"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="mixture: cannot load tokenizer"):
        Mixture(weights={"web": 1}, tokenizer=str(tmp_path / "bad.json"))
