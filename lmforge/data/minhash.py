"""MinHash signatures and LSH banding, computed in bulk with numpy (seed 002 §4.1.2: document-level
de-duplication by n-gram overlap).

A document becomes a set of n-gram shingles (words, or characters); each shingle is a 64-bit hash.
A signature is the minimum of `buckets * rows` independent hash functions over the shingles; two
documents agree on one signature entry with probability equal to their Jaccard similarity (Broder
1997). LSH (Leskovec et al., *Mining of Massive Datasets* §3.4) groups the signature into `buckets`
bands of `rows` entries; documents that share any whole band are candidates, which happens with
probability 1 - (1 - J^rows)^buckets. FineWeb's 14 x 8 layout on 5-grams puts that S-curve's
midpoint near J = 0.75.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import regex

# A CJK character is its own token: Chinese and Japanese do not separate words with spaces.
_TOKEN = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]|[\p{L}\p{N}_]+")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_PRIME = np.uint64(0x100000001B3)  # the FNV-1a 64-bit prime: an odd multiplier for combining


def tokens(text: str) -> list[str]:
    """Lower-cased words, with each CJK character a token of its own (punctuation dropped)."""
    return _TOKEN.findall(text.lower())


def _mix(x: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the whole 64-bit output. In place
    where asked: the signature arrays are the big ones, and fewer temporaries is most of the speed."""
    x = x if inplace else x.copy()
    tmp = np.empty_like(x)
    with np.errstate(over="ignore"):
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            np.right_shift(x, np.uint64(shift), out=tmp)
            np.bitwise_xor(x, tmp, out=x)
            np.multiply(x, np.uint64(mult), out=x)
        np.right_shift(x, np.uint64(31), out=tmp)
        np.bitwise_xor(x, tmp, out=x)
    return x


class ShingleHasher:
    """Stable 64-bit hashes of word (or character) n-grams; word hashes are cached."""

    def __init__(self, n: int = 5, unit: str = "word", cache_size: int = 1 << 20) -> None:
        if n < 1:
            raise ValueError(f"n-gram size must be >= 1, got {n}")
        if unit not in ("word", "char"):
            raise ValueError(f"shingle unit must be 'word' or 'char', got {unit!r}")
        self.n, self.unit, self.cache_size = n, unit, cache_size
        self._cache: dict[str, int] = {}

    def _ids(self, items: Sequence[str]) -> np.ndarray:
        cache = self._cache
        if len(cache) > self.cache_size:  # bounded memory on corpora with huge vocabularies
            cache.clear()
        out = []
        for w in items:
            h = cache.get(w)
            if h is None:
                h = cache[w] = zlib.crc32(w.encode()) + 1
            out.append(h)
        return np.asarray(out, dtype=np.uint64)

    def __call__(self, text: str) -> np.ndarray:
        """The distinct shingle hashes of `text` (a document shorter than n is one shingle)."""
        items = tokens(text) if self.unit == "word" else list(" ".join(tokens(text)))
        if not items:
            return np.zeros(0, dtype=np.uint64)
        ids = self._ids(items)
        n = min(self.n, len(ids))
        m = len(ids) - n + 1
        # Polynomial rolling combination of n consecutive token hashes, wrapping mod 2^64.
        h = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(n):
                h = h * _PRIME + ids[i : i + m]
        return np.unique(_mix(h))


class MinHasher:
    """`buckets * rows` hash functions h_k(x) = mix(x ^ seed_k); signatures for many documents at
    once: one (shingles x permutations) array per chunk, reduced per document with reduceat."""

    def __init__(self, buckets: int = 14, rows: int = 8, seed: int = 1, chunk: int = 1 << 15):
        if buckets < 1 or rows < 1:
            raise ValueError(f"buckets and rows must be >= 1, got {buckets} x {rows}")
        self.buckets, self.rows, self.chunk = buckets, rows, chunk
        rng = np.random.default_rng(seed)
        self.seeds = rng.integers(0, 2**63, buckets * rows, dtype=np.uint64)
        self.band_weights = rng.integers(0, 2**63, rows, dtype=np.uint64) | np.uint64(1)

    def signatures(self, shingles: Sequence[np.ndarray]) -> np.ndarray:
        """(documents, buckets * rows) uint64 minimum hashes; an empty document gets all-max."""
        k = len(self.seeds)
        out = np.full((len(shingles), k), _MASK64, dtype=np.uint64)
        lengths = np.fromiter((len(s) for s in shingles), dtype=np.int64, count=len(shingles))
        nonempty = np.flatnonzero(lengths)
        start = 0
        while start < len(nonempty):
            first = nonempty[start]
            if lengths[first] > self.chunk:
                # One huge document (a multi-MB line): hash it in slices with a running minimum,
                # so memory stays chunk x k whatever the document's size.
                row, doc = out[first], shingles[first]
                for at in range(0, len(doc), self.chunk):
                    part = _mix(doc[at : at + self.chunk, None] ^ self.seeds[None, :], inplace=True)
                    np.minimum(row, part.min(axis=0), out=row)
                start += 1
                continue
            # Take documents until the chunk holds about `self.chunk` shingles (at least one doc).
            stop = (
                start
                + 1
                + int(np.searchsorted(np.cumsum(lengths[nonempty[start + 1 :]]), self.chunk))
            )
            docs = nonempty[start:stop]
            flat = np.concatenate([shingles[i] for i in docs])
            hashed = _mix(flat[:, None] ^ self.seeds[None, :], inplace=True)
            offsets = np.concatenate([[0], np.cumsum(lengths[docs])[:-1]])
            out[docs] = np.minimum.reduceat(hashed, offsets, axis=0)
            start = stop
        return out

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(documents, buckets) uint64: each band's `rows` values folded into one key."""
        bands = signatures.reshape(len(signatures), self.buckets, self.rows)
        with np.errstate(over="ignore"):
            return _mix((bands * self.band_weights).sum(axis=2, dtype=np.uint64))


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving; the root of a set is its smallest member."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def roots(self) -> np.ndarray:
        """The root of every element, by pointer jumping until nothing changes."""
        parent = self.parent.copy()
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return int(x)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def duplicate_clusters(band_keys: Sequence[np.ndarray] | np.ndarray) -> UnionFind:
    """Union every pair of documents that share a band key, one bucket at a time (so memory is a
    few arrays of length `documents`, not the signature matrix)."""
    columns = band_keys if isinstance(band_keys, Sequence) else list(band_keys.T)
    uf = UnionFind(len(columns[0]) if columns else 0)
    for column in columns:
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        # Each run of equal keys is chained: order[i] with order[i + 1].
        for i in same.tolist():
            uf.union(int(order[i]), int(order[i + 1]))
    return uf


def near_duplicates(
    texts: Sequence[str], *, n: int = 5, buckets: int = 14, rows: int = 8, unit: str = "word"
) -> np.ndarray:
    """Boolean mask of documents to drop: all but the first of each near-duplicate cluster."""
    hasher, minhasher = ShingleHasher(n, unit), MinHasher(buckets, rows)
    keys = minhasher.band_keys(minhasher.signatures([hasher(t) for t in texts]))
    uf = duplicate_clusters(keys)
    return uf.roots() != np.arange(len(texts))
