"""MinHash-LSH against brute-force Jaccard similarity and the LSH S-curve written out."""

import random

import numpy as np
import pytest

from lmforge.data.minhash import (
    MinHasher,
    ShingleHasher,
    UnionFind,
    _mix,
    near_duplicates,
    tokens,
)


def _words(rng: random.Random, n: int) -> list[str]:
    return [f"w{rng.randrange(5000)}" for _ in range(n)]


def _jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(t: str) -> set:
        w = tokens(t)
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def _mutate(rng: random.Random, words: list[str], k: int) -> list[str]:
    out = list(words)
    for i in rng.sample(range(len(out)), k):
        out[i] = f"x{rng.randrange(10**6)}"
    return out


def test_signature_agreement_estimates_jaccard():
    rng = random.Random(0)
    hasher, mh = ShingleHasher(5), MinHasher(buckets=64, rows=8)
    for k in (2, 10, 30, 60):
        base = _words(rng, 400)
        a, b = " ".join(base), " ".join(_mutate(rng, base, k))
        sig = mh.signatures([hasher(a), hasher(b)])
        estimate = float((sig[0] == sig[1]).mean())
        # 512 hash functions: the standard error of the estimate is at most 0.5/sqrt(512) ~ 0.022.
        assert abs(estimate - _jaccard(a, b)) < 0.08


def test_shingles_match_brute_force_count():
    text = "a b c d e f a b c d e f g"
    w = tokens(text)
    distinct = {tuple(w[i : i + 3]) for i in range(len(w) - 2)}
    assert len(ShingleHasher(3)(text)) == len(distinct)
    assert ShingleHasher(3)("短").size == 1  # a document shorter than n is one shingle
    assert tokens("数据清洗 data-Cleaning") == ["数", "据", "清", "洗", "data", "cleaning"]


def test_near_duplicate_recall_and_precision_on_injected_pairs():
    rng = random.Random(1)
    docs, pairs_hi, pairs_lo = [], [], []
    for _ in range(60):
        base = _words(rng, 300)
        docs.append(" ".join(base))
        # one substitution per ~150 words: 5-gram Jaccard ~ 0.94, and a distant variant ~ 0.3
        near = " ".join(_mutate(rng, base, 2))
        far = " ".join(_mutate(rng, base, 60))
        docs += [near, far]
        pairs_hi.append((len(docs) - 3, len(docs) - 2))
        pairs_lo.append((len(docs) - 3, len(docs) - 1))
    drop = near_duplicates(docs)
    assert all(_jaccard(docs[a], docs[b]) >= 0.85 for a, b in pairs_hi)
    assert sum(drop[b] for _, b in pairs_hi) >= 0.95 * len(pairs_hi)
    assert sum(drop[b] for _, b in pairs_lo) == 0  # Jaccard ~0.3 pairs are kept


def test_lsh_candidate_probability_follows_s_curve():
    # P(candidate) = 1 - (1 - J^r)^b (Leskovec et al. §3.4) for b=14, r=8 at J = 0.8.
    rng = random.Random(2)
    hasher, mh = ShingleHasher(5), MinHasher(14, 8)
    hits, trials = 0, 150
    jaccards = []
    for _ in range(trials):
        base = _words(rng, 200)
        a, b = " ".join(base), " ".join(_mutate(rng, base, 3))
        jaccards.append(_jaccard(a, b))
        keys = mh.band_keys(mh.signatures([hasher(a), hasher(b)]))
        hits += bool((keys[0] == keys[1]).any())
    expected = np.mean([1 - (1 - j**8) ** 14 for j in jaccards])
    assert abs(hits / trials - expected) < 0.12


def test_union_find_roots_are_smallest_members():
    uf = UnionFind(6)
    uf.union(4, 2)
    uf.union(2, 5)
    uf.union(1, 3)
    assert uf.roots().tolist() == [0, 1, 2, 1, 2, 2]


def test_bad_parameters():
    with pytest.raises(ValueError, match="n-gram size"):
        ShingleHasher(0)
    with pytest.raises(ValueError, match="buckets and rows"):
        MinHasher(0, 8)


def test_huge_documents_are_hashed_in_slices_with_the_same_signature():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 2**63, n, dtype=np.uint64) for n in (5, 3000, 40, 0, 2500, 7)]
    whole = MinHasher(chunk=1 << 20).signatures(docs)  # everything in one pass
    sliced = MinHasher(chunk=256).signatures(docs)  # 3000- and 2500-shingle docs in slices
    assert np.array_equal(whole, sliced)
    # The brute-force minimum over every shingle, for one permutation, as a check of both.
    h = MinHasher(chunk=256)
    x = docs[1] ^ h.seeds[3]
    assert sliced[1, 3] == _mix(x).min()
