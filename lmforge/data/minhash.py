"""MinHash signatures and LSH banding, computed in bulk with numpy (seed 002 §4.1.2: document-level
de-duplication by n-gram overlap).

A document becomes a set of n-gram shingles (words, or characters); each shingle is a 64-bit hash.
A signature is the minimum of `buckets * rows` independent hash functions over the shingles; two
documents agree on one signature entry with probability equal to their Jaccard similarity (Broder
1997). LSH (Leskovec et al., *Mining of Massive Datasets* §3.4) groups the signature into `buckets`
bands of `rows` entries; documents that share any whole band are candidates, which happens with
probability 1 - (1 - J^rows)^buckets. FineWeb's 14 x 8 layout on 5-grams puts that S-curve's
midpoint near J = 0.75.

Banding alone is not a threshold: with 14 x 8 a pair at J = 0.7 is a candidate half of the time.
So candidate pairs are verified (Leskovec et al. §3.4.3, "check candidate pairs"): the exact
Jaccard of the two shingle sets, re-computed only for documents that have a candidate and kept in
a temporary file, must reach a threshold before the pair is merged.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

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


# Within one band's run of equal keys, each member is paired with the run's first member and the
# _WINDOW members before it. Without verification this connects the same documents as all pairs
# would (neighbours chain the run); with it, a run of k documents costs O(k) checks, not O(k^2).
_WINDOW = 4


def candidate_pairs(band_keys: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(pairs, 2) int64 document indices a < b that share a band key, unique and sorted; one
    bucket at a time, so memory is a few arrays of length `documents`."""
    columns = band_keys if isinstance(band_keys, Sequence) else list(band_keys.T)
    n = len(columns[0]) if columns else 0
    found = []
    for column in columns:
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        for d in range(1, _WINDOW + 1):
            at = np.flatnonzero(ordered[d:] == ordered[:-d])
            if not len(at):  # no run longer than d, so none longer than d + 1 either
                break
            found.append(np.stack([order[at], order[at + d]], axis=1))
        if len(at):  # some run is longer than _WINDOW: pair its far members with its first
            first = np.r_[True, ordered[1:] != ordered[:-1]]
            start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
            far = np.flatnonzero(np.arange(n) - start > _WINDOW)
            found.append(np.stack([order[start[far]], order[far]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found).astype(np.int64), axis=1)
    code = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([code // n, code % n], axis=1)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A & B| / |A | B| of two sorted arrays of distinct shingle hashes (two empty sets: 1)."""
    if len(a) > len(b):
        a, b = b, a
    if not len(a):
        return 0.0 if len(b) else 1.0
    at = np.minimum(np.searchsorted(b, a), len(b) - 1)
    common = int(np.count_nonzero(b[at] == a))
    return common / (len(a) + len(b) - common)


class ShingleStore:
    """Shingle sets of selected documents, written once in increasing document order to an
    anonymous temporary file in `directory` and read back memory-mapped: verification needs
    random access to them, and holding them in memory would grow with the corpus."""

    def __init__(self, directory: str | Path | None = None) -> None:
        # Open for the store's whole life (closed, and so deleted, by `close()`).
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115
        self._docs: list[int] = []
        self._ends: list[int] = []
        self._size = 0
        self._data: np.ndarray | None = None

    def add(self, doc: int, shingles: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(shingles, dtype=np.uint64).tobytes())
        self._size += len(shingles)
        self._docs.append(doc)
        self._ends.append(self._size)

    def freeze(self) -> None:
        self._file.flush()
        self.docs = np.asarray(self._docs, dtype=np.int64)
        self.ends = np.asarray(self._ends, dtype=np.int64)
        self._data = (
            np.memmap(self._file, dtype=np.uint64, mode="r", shape=(self._size,))
            if self._size
            else np.zeros(0, dtype=np.uint64)
        )

    def __getitem__(self, doc: int) -> np.ndarray:
        assert self._data is not None, "freeze() the store before reading it"
        at = int(np.searchsorted(self.docs, doc))
        if at == len(self.docs) or self.docs[at] != doc:
            raise KeyError(f"document {doc} has no stored shingles")
        start = int(self.ends[at - 1]) if at else 0
        return self._data[start : int(self.ends[at])]

    def close(self) -> None:
        self._data = None
        self._file.close()


def duplicate_clusters(
    band_keys: Sequence[np.ndarray] | np.ndarray,
    *,
    shingles: Callable[[np.ndarray], Iterable[tuple[int, np.ndarray]]] | None = None,
    threshold: float = 0.85,
    scratch: str | Path | None = None,
) -> tuple[UnionFind, dict]:
    """Union-find clusters over the LSH candidate pairs, and counts of what was checked.

    With `shingles` (given ascending document indices, yields `(index, shingle hashes)` for each),
    a pair is merged only if the exact Jaccard of the two shingle sets is >= `threshold`; a pair
    already in one cluster is not checked again. Without it every candidate pair is merged."""
    columns = band_keys if isinstance(band_keys, Sequence) else list(band_keys.T)
    uf = UnionFind(len(columns[0]) if columns else 0)
    pairs = candidate_pairs(columns)
    summary = {"candidate_pairs": len(pairs), "checked_pairs": 0, "rejected_pairs": 0}
    store = None
    if shingles is not None and len(pairs):
        store = ShingleStore(scratch)
        for doc, sh in shingles(np.unique(pairs)):
            store.add(doc, sh)
        store.freeze()
    try:
        for block in range(0, len(pairs), 1 << 16):  # Python ints a block at a time
            for a, b in pairs[block : block + (1 << 16)].tolist():
                ra, rb = uf.find(a), uf.find(b)
                if ra == rb:
                    continue
                if store is not None:
                    summary["checked_pairs"] += 1
                    if jaccard(store[a], store[b]) < threshold:
                        summary["rejected_pairs"] += 1
                        continue
                uf.parent[max(ra, rb)] = min(ra, rb)
    finally:
        if store is not None:
            store.close()
    return uf, summary


def near_duplicates(
    texts: Sequence[str],
    *,
    n: int = 5,
    buckets: int = 14,
    rows: int = 8,
    unit: str = "word",
    threshold: float | None = 0.85,
) -> np.ndarray:
    """Boolean mask of documents to drop: all but the first of each near-duplicate cluster.
    `threshold=None` merges every LSH candidate pair without checking its exact Jaccard."""
    hasher, minhasher = ShingleHasher(n, unit), MinHasher(buckets, rows)
    keys = minhasher.band_keys(minhasher.signatures([hasher(t) for t in texts]))

    def shingles(docs: np.ndarray) -> Iterable[tuple[int, np.ndarray]]:
        return ((i, hasher(texts[i])) for i in docs.tolist())

    uf, _ = duplicate_clusters(
        keys, shingles=None if threshold is None else shingles, threshold=threshold or 0.0
    )
    return uf.roots() != np.arange(len(texts))
