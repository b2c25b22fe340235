"""MinHash-LSH against brute-force Jaccard similarity and the LSH S-curve written out."""

import random

import numpy as np
import pytest

from lmforge.data.minhash import (
    MinHasher,
    ShingleHasher,
    UnionFind,
    _mix,
    candidate_pairs,
    duplicate_clusters,
    jaccard,
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


def _spaced_variant(words: list[str], k: int, tag: str) -> list[str]:
    # k substitutions at least 5 words apart: each removes 5 shingles and adds 5 new ones, so
    # with M shingles the 5-gram Jaccard is (M - 5k) / (M + 5k) exactly.
    out = list(words)
    for j in range(k):
        out[10 + 20 * j] = f"{tag}{j}"
    return out


def test_verification_merges_0_9_but_not_0_8_candidate_pairs():
    # M = 180, k = 4: J = 160/200 = 0.80; M = 190, k = 2: J = 180/200 = 0.90.
    a = [f"a{i}" for i in range(184)]
    b = [f"b{i}" for i in range(194)]
    docs = [
        " ".join(a),
        " ".join(_spaced_variant(a, 4, "x")),
        " ".join(b),
        " ".join(_spaced_variant(b, 2, "y")),
        " ".join(f"c{i}" for i in range(150)),
    ]
    assert _jaccard(docs[0], docs[1]) == pytest.approx(0.80)  # brute force over 5-gram tuples
    assert _jaccard(docs[2], docs[3]) == pytest.approx(0.90)
    hasher, mh = ShingleHasher(5), MinHasher(14, 8)
    shingles = [hasher(d) for d in docs]
    assert jaccard(shingles[0], shingles[1]) == pytest.approx(0.80)
    pairs = candidate_pairs(mh.band_keys(mh.signatures(shingles))).tolist()
    assert [0, 1] in pairs and [2, 3] in pairs  # both are LSH candidates (P = 0.92 and 0.9997)
    assert near_duplicates(docs).tolist() == [False, False, False, True, False]
    assert near_duplicates(docs, threshold=None).tolist() == [False, True, False, True, False]
    assert near_duplicates(docs, threshold=0.75).tolist() == [False, True, False, True, False]


def test_exact_jaccard_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(50):
        x = set(rng.integers(0, 60, rng.integers(0, 40)).tolist())
        y = set(rng.integers(0, 60, rng.integers(0, 40)).tolist())
        expected = len(x & y) / len(x | y) if x | y else 1.0
        a, b = (np.array(sorted(s), dtype=np.uint64) for s in (x, y))
        assert jaccard(a, b) == pytest.approx(expected)


def _components(n: int, pairs) -> list[int]:
    uf = UnionFind(n)
    for a, b in pairs:
        uf.union(int(a), int(b))
    return uf.roots().tolist()


def test_candidate_pairs_connect_what_shared_band_keys_connect():
    # Few distinct keys: runs of up to ~20 documents, longer than the pairing window.
    rng = np.random.default_rng(4)
    n = 120
    keys = rng.integers(0, 12, (n, 3)).astype(np.uint64)
    keys[:, 1] += np.uint64(1000)  # make columns independent
    keys[::2, 2] = np.arange(0, n, 2, dtype=np.uint64) + np.uint64(5000)  # half unique
    brute = {(a, b) for a in range(n) for b in range(a + 1, n) if (keys[a] == keys[b]).any()}
    pairs = candidate_pairs(keys)
    assert {tuple(p) for p in pairs.tolist()} <= brute  # only true candidates, each once
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    assert _components(n, pairs) == _components(n, brute)
    # Runs of at most 5 (window 4 + the run's first member): exactly all pairs.
    small = np.repeat(np.arange(30, dtype=np.uint64), 4)[:, None]
    brute_small = {(a, b) for a in range(120) for b in range(a + 1, 120) if a // 4 == b // 4}
    assert {tuple(p) for p in candidate_pairs(small).tolist()} == brute_small


def test_verified_clusters_check_each_pair_once_and_count(tmp_path):
    docs = [np.arange(i, i + 100, dtype=np.uint64) for i in (0, 0, 5, 60)]
    keys = np.zeros((4, 2), dtype=np.uint64)  # every document a candidate of every other
    uf, summary = duplicate_clusters(
        keys, shingles=lambda ids: ((i, docs[i]) for i in ids.tolist()), scratch=tmp_path
    )
    # J(0,1) = 1, J(0,2) = 95/105 = 0.905, J(0,3) = 40/160: 3 stays alone.
    assert uf.roots().tolist() == [0, 0, 0, 3]
    assert summary["candidate_pairs"] == 6
    assert summary["rejected_pairs"] == 3  # (0,3), (1,3), (2,3); (1,2) skipped: one cluster
    assert summary["checked_pairs"] == 5
