import json
import math
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from lmforge.data.shards import TokenShards, read_index, unigram_entropy, write_shards
from lmforge.errors import CorpusError, LmforgeError
from lmforge.tokenizer import train_bpe

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "模型",
    "🙂",
]


def _document(i: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40))))


DOCS = [{"text": _document(i), "id": f"doc{i}"} for i in range(200)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe((d["text"] for d in DOCS), vocab_size=300)


@pytest.fixture(scope="module")
def shards(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "out"
    index = write_shards(DOCS, tok, out, val_fraction=0.2, shard_tokens=500, batch_docs=7)
    return out, index


def _documents_of(directory, split):
    """Token lists of the documents stored in a split, cut at each EOS."""
    index = read_index(directory)
    stream = np.concatenate(
        [np.fromfile(directory / s["file"], dtype=index["dtype"]) for s in index["splits"][split]]
    ).tolist()
    docs, current = [], []
    for token in stream:
        current.append(token)
        if token == index["eos_id"]:
            docs.append(current)
            current = []
    assert current == []
    return docs


def test_index_contents(tok, shards):
    out, index = shards
    assert json.loads((out / "index.json").read_text()) == index
    assert index["format"] == "lmforge-shards" and index["version"] == 1
    assert index["dtype"] == "uint16" and index["vocab_size"] == tok.vocab_size
    assert index["eos_id"] == tok.eos_id and index["tokenizer_sha256"] == tok.sha256
    assert index["bos_id"] == tok.bos_id is not None
    assert (index["seed"], index["val_fraction"]) == (0, 0.2)
    train = index["splits"]["train"]
    assert len(train) > 1 and [s["file"] for s in train][:2] == [
        "train_00000.bin",
        "train_00001.bin",
    ]
    for split in index["splits"].values():
        for shard in split:
            tokens = np.fromfile(out / shard["file"], dtype=np.uint16)
            assert len(tokens) == shard["tokens"]
            assert (tokens == tok.eos_id).sum() == shard["documents"]
    n_docs = {name: sum(s["documents"] for s in split) for name, split in index["splits"].items()}
    assert n_docs["train"] + n_docs["validation"] == len(DOCS)
    assert 20 <= n_docs["validation"] <= 60


def test_token_stream_equals_encoded_documents(tok, shards):
    out, _ = shards
    stored = {split: _documents_of(out, split) for split in ("train", "validation")}
    position = {"train": 0, "validation": 0}
    for doc in DOCS:
        expected = tok.encode(doc["text"], add_bos=True, add_eos=True)
        # Each document is the next one of exactly one split: order is kept within each split.
        matches = [s for s in stored if stored[s][position[s] : position[s] + 1] == [expected]]
        assert len(matches) == 1
        position[matches[0]] += 1
    assert position == {split: len(docs) for split, docs in stored.items()}


def test_split_independent_of_batching_and_seeded(tok, shards, tmp_path):
    out, index = shards
    again = write_shards(DOCS, tok, tmp_path / "a", val_fraction=0.2, shard_tokens=500)
    assert again == index
    for shard in index["splits"]["train"] + index["splits"]["validation"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (out / shard["file"]).read_bytes()
    reseeded = write_shards(DOCS, tok, tmp_path / "b", val_fraction=0.2, seed=1, shard_tokens=500)
    assert _documents_of(tmp_path / "b", "validation") != _documents_of(out, "validation")
    assert reseeded["seed"] == 1


def test_at_least_one_validation_document(tok, tmp_path):
    texts = [d["text"] for d in DOCS[:5]]
    index = write_shards(texts, tok, tmp_path / "s", val_fraction=1e-9, shard_tokens=1)
    assert [s["documents"] for s in index["splits"]["validation"]] == [1]
    # shard_tokens=1 puts every document in its own file: the one moved leaves no gap in the names.
    train = index["splits"]["train"]
    assert [s["file"] for s in train] == [f"train_{i:05d}.bin" for i in range(4)]
    (moved,) = _documents_of(tmp_path / "s", "validation")
    kept = _documents_of(tmp_path / "s", "train")
    encoded = [tok.encode(t, add_bos=True, add_eos=True) for t in texts]
    assert moved in encoded and kept == [e for e in encoded if e != moved]
    single = write_shards(texts[:1], tok, tmp_path / "one", val_fraction=0.5)
    assert sum(s["documents"] for split in single["splits"].values() for s in split) == 1
    none = write_shards(texts, tok, tmp_path / "none", val_fraction=0.0)
    assert none["splits"]["validation"] == []


def test_get_batch(tok, shards):
    out, _ = shards
    data = TokenShards(out, "train")
    assert data.n_tokens == sum(s["tokens"] for s in data.index["splits"]["train"])
    assert (data.vocab_size, data.eos_id) == (tok.vocab_size, tok.eos_id)
    x, y = data.get_batch(8, 16, seed=3, step=5)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = data.get_batch(8, 16, seed=3, step=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, data.get_batch(8, 16, seed=3, step=6)[0])
    assert not torch.equal(x, data.get_batch(8, 16, seed=3, step=5, micro_step=1)[0])
    assert not torch.equal(x, data.get_batch(8, 16, seed=4, step=5)[0])
    # Every row is a real window of one shard.
    shards = [np.fromfile(out / s["file"], dtype=np.uint16) for s in data.index["splits"]["train"]]
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        window = row_x + row_y[-1:]
        assert any(_contains(s, window) for s in shards)


def _contains(tokens: np.ndarray, window: list[int]) -> bool:
    n = len(window)
    return any(tokens[i : i + n].tolist() == window for i in range(len(tokens) - n + 1))


def test_get_batch_samples_shards_by_length(tmp_path, tok):
    # Two shards, one 10x longer: windows should come from it about 10x as often.
    long_doc, short_doc = "alpha " * 2000, "beta " * 200
    write_shards([long_doc, short_doc], tok, tmp_path / "s", val_fraction=0, shard_tokens=10)
    data = TokenShards(tmp_path / "s")
    x, _ = data.get_batch(4000, 8, seed=0, step=0)
    (alpha,) = set(tok.encode(long_doc)) - set(tok.encode(short_doc))
    from_long = (x == alpha).any(dim=1).float().mean().item()
    expected = (data.lengths[0] - 8) / (data.lengths - 8).sum()
    assert abs(from_long - expected) < 0.03


def test_sequence_too_long(shards):
    out, _ = shards
    data = TokenShards(out, "validation")
    too_long = int(data.lengths.max())
    with pytest.raises(CorpusError, match=rf"{data.n_tokens} tokens.*seq_len={too_long}"):
        data.get_batch(2, too_long, seed=0, step=0)
    with pytest.raises(CorpusError, match="needs more than"):
        next(data.eval_batches(2, too_long))


def test_eval_batches(shards):
    out, _ = shards
    data = TokenShards(out, "validation")
    seq_len = 10
    batches = list(data.eval_batches(4, seq_len))
    # Reference: windows of seq_len + 1 tokens stepping by seq_len inside each shard.
    expected = []
    for shard in data.index["splits"]["validation"]:
        tokens = np.fromfile(out / shard["file"], dtype=np.uint16).astype(np.int64)
        for start in range(0, len(tokens) - seq_len, seq_len):
            expected.append(tokens[start : start + seq_len + 1])
    got = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in batches])
    assert torch.equal(got, torch.from_numpy(np.stack(expected)))
    assert all(x.shape[0] == 4 for x, _ in batches[:-1])
    assert len(list(data.eval_batches(4, seq_len, max_batches=2))) == 2
    again = data.eval_batches(4, seq_len)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def test_truncated_and_foreign_files(shards, tmp_path):
    out, index = shards
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    first = copy / index["splits"]["train"][0]["file"]
    first.write_bytes(first.read_bytes()[:-2])
    with pytest.raises(CorpusError, match=rf"{first} has \d+ bytes.*truncated"):
        TokenShards(copy)
    (copy / "index.json").write_text('{"format": "something-else"}')
    with pytest.raises(CorpusError, match="index.json is not an index of lmforge-shards"):
        TokenShards(copy)
    (copy / "index.json").write_text("{not json")
    with pytest.raises(CorpusError, match="index.json is corrupt"):
        TokenShards(copy)
    with pytest.raises(CorpusError, match="index.json not found"):
        TokenShards(tmp_path)
    with pytest.raises(CorpusError, match="no split 'test'"):
        TokenShards(out, "test")


def _failing(docs, after):
    for i, doc in enumerate(docs):
        if i == after:
            raise RuntimeError("source broke")
        yield doc


def test_atomic_write(tok, tmp_path):
    out = tmp_path / "shards"
    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(_failing(DOCS, 150), tok, out, shard_tokens=100, batch_docs=16)
    assert list(tmp_path.iterdir()) == []
    first = write_shards(DOCS[:50], tok, out, val_fraction=0.1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(LmforgeError, match="already exists"):
        write_shards(DOCS, tok, out)
    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(_failing(DOCS, 150), tok, out, overwrite=True, shard_tokens=100)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]
    second = write_shards(DOCS, tok, out, val_fraction=0.1, overwrite=True)
    assert second != first and read_index(out) == second
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]


def test_refuses_to_overwrite_foreign_directory(tok, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(LmforgeError, match="refusing to overwrite"):
        write_shards(DOCS, tok, tmp_path, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_tokenizer_without_eos(tmp_path):
    no_eos = train_bpe([d["text"] for d in DOCS], vocab_size=300, special_tokens=["<|im_start|>"])
    with pytest.raises(LmforgeError, match="no EOS token"):
        write_shards(DOCS, no_eos, tmp_path / "s")


def test_unigram_entropy(shards):
    out, _ = shards
    tokens = np.concatenate(
        [np.fromfile(out / s["file"], dtype=np.uint16) for s in read_index(out)["splits"]["train"]]
    ).tolist()
    counts = Counter(tokens)
    expected = -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values())
    assert unigram_entropy(out) == pytest.approx(expected, rel=1e-12)
