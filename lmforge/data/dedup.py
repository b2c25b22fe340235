"""De-duplication at three levels (seed 002 §4.1.2): exact documents, repeated lines or sentence
spans, and near-duplicate documents (MinHash-LSH).

These are corpus-level steps: each runs in three parts so that shards can be spread over tasks.
`collector()` gathers small keys while a shard streams past; `decide()` sees every shard's keys
once and says, per shard, what to remove; `apply()` then edits or drops each document. The first
occurrence in (shard, position) order is kept, so the result does not depend on the task count.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import regex

from lmforge.data.minhash import MinHasher, ShingleHasher, duplicate_clusters

_SPACE = regex.compile(r"\s+")
_SENTENCE = regex.compile(r"(?<=[.!?。！？])\s*")


def normalised_hash(text: str) -> int:
    """64-bit hash of the text after NFKC, lower-casing and whitespace collapsing."""
    norm = _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little")


def _first_occurrences(keys: list[np.ndarray]) -> list[np.ndarray]:
    """Per shard, a boolean mask: True where the key occurred earlier (shard order, then
    position)."""
    flat = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    _, first = np.unique(flat, return_index=True)
    dup = np.ones(len(flat), dtype=bool)
    dup[first] = False
    bounds = np.cumsum([0] + [len(k) for k in keys])
    return [dup[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class _HashCollector:
    def __init__(self, fn) -> None:
        self.fn, self.keys = fn, []

    def add(self, doc: dict) -> None:
        self.keys.append(self.fn(doc["text"]))

    def result(self) -> dict[str, np.ndarray]:
        return {"keys": np.asarray(self.keys, dtype=np.uint64)}


class ExactDedup:
    """Drop documents whose normalised text hash was seen before."""

    def collector(self) -> _HashCollector:
        return _HashCollector(normalised_hash)

    def decide(self, collected: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return [{"drop": d} for d in _first_occurrences([c["keys"] for c in collected])]

    def apply(self, doc: dict, index: int, decision: dict) -> tuple[list[dict], str | None]:
        return ([], "exact_duplicate") if decision["drop"][index] else ([doc], None)


def _units(text: str, unit: str, span: int) -> list[str]:
    if unit == "line":
        return text.split("\n")
    sentences = [s for s in _SENTENCE.split(text) if s.strip()]
    return [" ".join(sentences[i : i + span]) for i in range(0, len(sentences), span)]


class _UnitCollector:
    def __init__(self, step: LineDedup) -> None:
        self.step, self.hashes, self.counts = step, [], []

    def add(self, doc: dict) -> None:
        units = self.step.units(doc["text"])
        self.counts.append(len(units))
        self.hashes += [self.step.unit_hash(u) for u in units]

    def result(self) -> dict[str, np.ndarray]:
        return {
            "keys": np.asarray(self.hashes, dtype=np.uint64),
            "counts": np.asarray(self.counts, dtype=np.int64),
        }


class LineDedup:
    """C4 (Raffel et al. 2020): keep one copy of any repeated three-sentence span (`unit:
    span`), or of any repeated line (`unit: line`, which removes boilerplate such as navigation
    and footers); units shorter than `min_chars` are never removed. A document left empty is
    dropped."""

    def __init__(self, unit: str = "line", span_sentences: int = 3, min_chars: int = 20) -> None:
        if unit not in ("line", "span"):
            raise ValueError(f"unit must be 'line' or 'span', got {unit!r}")
        self.unit, self.span, self.min_chars = unit, span_sentences, min_chars

    def units(self, text: str) -> list[str]:
        return _units(text, self.unit, self.span)

    def unit_hash(self, unit: str) -> int:
        # Short units (blank lines, "}") hash to 0, which is never treated as a duplicate.
        return normalised_hash(unit) | 1 if len(unit.strip()) >= self.min_chars else 0

    def collector(self) -> _UnitCollector:
        return _UnitCollector(self)

    def decide(self, collected: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        masks = _first_occurrences([c["keys"] for c in collected])
        out = []
        for c, mask in zip(collected, masks):
            out.append({"drop": mask & (c["keys"] != 0), "counts": c["counts"]})
        return out

    def apply(self, doc: dict, index: int, decision: dict) -> tuple[list[dict], str | None]:
        if "offsets" not in decision:
            decision["offsets"] = np.concatenate([[0], np.cumsum(decision["counts"])])
        start = decision["offsets"][index]
        units = self.units(doc["text"])
        drop = decision["drop"][start : start + len(units)]
        if not drop.any():
            return [doc], None
        kept = [u for u, d in zip(units, drop) if not d]
        removed = int(drop.sum())
        doc["text"] = ("\n" if self.unit == "line" else " ").join(kept).strip()
        doc["meta"]["dedup_units_removed"] = removed
        return ([], "all_units_duplicated") if not doc["text"] else ([doc], None)


class _MinHashCollector:
    def __init__(self, step: MinHashDedup) -> None:
        self.step, self.pending, self.keys = step, [], []

    def add(self, doc: dict) -> None:
        self.pending.append(self.step.shingles(doc["text"]))
        if len(self.pending) >= 512:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            signatures = self.step.minhasher.signatures(self.pending)
            self.keys.append(self.step.minhasher.band_keys(signatures))
            self.pending = []

    def result(self) -> dict[str, np.ndarray]:
        self._flush()
        empty = np.zeros((0, self.step.minhasher.buckets), dtype=np.uint64)
        return {"keys": np.concatenate(self.keys) if self.keys else empty}


class MinHashDedup:
    """Near-duplicate documents by MinHash-LSH (FineWeb defaults: word 5-grams, 14 buckets of 8
    hashes); union-find clusters, the first document of each cluster kept.

    With `verify` (the default) an LSH candidate pair is merged only if the exact Jaccard of its
    two shingle sets is >= `threshold`. 0.85 is where the 14 x 8 S-curve reaches 0.99 (1 - (1 -
    0.85^8)^14 = 0.988): above it LSH finds nearly every pair, so the result is close to "all
    pairs with Jaccard >= 0.85"; a lower threshold would only filter pairs that LSH finds by
    chance (half of them at 0.7). With another layout choose a threshold on its S-curve's top."""

    def __init__(
        self,
        n: int = 5,
        buckets: int = 14,
        rows: int = 8,
        unit: str = "word",
        verify: bool = True,
        threshold: float = 0.85,
    ) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.shingles = ShingleHasher(n, unit)
        self.minhasher = MinHasher(buckets, rows)
        self.verify, self.threshold = verify, threshold
        self.plan: dict = {}

    def collector(self) -> _MinHashCollector:
        return _MinHashCollector(self)

    def decide(
        self,
        collected: list[dict[str, np.ndarray]],
        documents: Callable[[int], Iterable[str]] | None = None,
        scratch: str | Path | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """`documents(shard)` yields that shard's texts again in collection order: verification
        re-shingles the documents that have a candidate (in a temporary file under `scratch`)."""
        keys = [c["keys"] for c in collected]
        sizes = [len(k) for k in keys]
        bounds = np.cumsum([0, *sizes])
        flat = np.concatenate(keys) if keys else np.zeros((0, self.minhasher.buckets), np.uint64)
        if self.verify and documents is None:
            raise ValueError(
                "minhash_dedup: verification needs the documents again (or verify: false)"
            )

        def shingles(docs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
            for shard in range(len(sizes)):
                lo, hi = bounds[shard], bounds[shard + 1]
                wanted = (docs[(docs >= lo) & (docs < hi)] - lo).tolist()
                if not wanted:
                    continue
                at = 0
                for i, text in enumerate(documents(shard)):
                    if i == wanted[at]:
                        yield int(lo) + i, self.shingles(text)
                        at += 1
                        if at == len(wanted):
                            break

        uf, self.plan = duplicate_clusters(
            list(flat.T),
            shingles=shingles if self.verify else None,
            threshold=self.threshold,
            scratch=scratch,
        )
        roots = uf.roots()
        drop = roots != np.arange(len(flat))
        return [{"drop": drop[a:b], "cluster": roots[a:b]} for a, b in zip(bounds[:-1], bounds[1:])]

    def apply(self, doc: dict, index: int, decision: dict) -> tuple[list[dict], str | None]:
        if decision["drop"][index]:
            return [], "near_duplicate"
        return [doc], None
