"""Decontamination: keep evaluation data out of training text (seed 002 §4.1.2, dataset-level
de-duplication), by word n-gram overlap as GPT-3 did (Brown et al. 2020, appendix C: 13-grams;
a colliding n-gram is cut out with 200 characters either side, and a document split into more
than 10 pieces is dropped whole).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import regex

from lmforge.errors import ConfigError

_TOKEN = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]|[\p{L}\p{N}_]+")
_PRIME = np.uint64(0x100000001B3)


def _token_hashes(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token: a stable 64-bit hash of its lower-cased form, start and end offsets."""
    found = list(_TOKEN.finditer(text.lower()))
    words = [m.group() for m in found]
    ids = np.fromiter(
        (int.from_bytes(w.encode()[:8].ljust(8, b"\0"), "little") ^ len(w) for w in words),
        dtype=np.uint64,
        count=len(words),
    )
    starts = np.fromiter((m.start() for m in found), dtype=np.int64, count=len(found))
    ends = np.fromiter((m.end() for m in found), dtype=np.int64, count=len(found))
    # Long words share an 8-byte prefix; mix in a hash of the rest so they stay distinct.
    long = [i for i, w in enumerate(words) if len(w.encode()) > 8]
    for i in long:
        ids[i] ^= np.uint64(hash_bytes(words[i].encode()[8:]))
    return ids, starts, ends


def hash_bytes(b: bytes) -> int:
    """FNV-1a 64: stable across processes (Python's hash() of str is salted)."""
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    m = len(ids) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            h = h * _PRIME + ids[i : i + m]
    return h


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def evaluation_texts(sources: Iterable[str]) -> Iterator[str]:
    """The text of every item of each source: an lmforge task name or file (as `lmforge eval`
    accepts), or a plain JSONL/text file of evaluation data."""
    from lmforge.evaluation.tasks import TaskError, load_task, resolve_task

    for source in sources:
        path = Path(source)
        if path.suffix in (".jsonl", ".txt") and path.is_file() and path.name != "task.json":
            with path.open(encoding="utf-8") as f:
                for line in f:
                    if path.suffix == ".txt":
                        yield line
                    elif line.strip():
                        yield from _strings(json.loads(line))
            continue
        try:
            task = load_task(resolve_task(source))
        except TaskError as e:
            raise ConfigError(f"decontaminate: {e}") from None
        for doc in task.docs:
            yield from _strings(doc)


class Decontaminator:
    """Pipeline step: cut (GPT-3) or drop training text sharing an n-gram with evaluation data."""

    def __init__(
        self,
        tasks: list[str] | None = None,
        n: int = 13,
        action: str = "cut",
        window: int = 200,
        max_pieces: int = 10,
    ) -> None:
        if not tasks:
            raise ValueError("decontaminate: give `tasks`, lmforge task names or evaluation files")
        if action not in ("cut", "drop"):
            raise ValueError(f"decontaminate: action must be 'cut' or 'drop', got {action!r}")
        self.n, self.action, self.window, self.max_pieces = n, action, window, max_pieces
        grams = [ngram_hashes(_token_hashes(t)[0], n) for t in evaluation_texts(tasks)]
        self.items = len(grams)
        self.too_short = sum(len(g) == 0 for g in grams)
        self.grams = np.unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)

    def __call__(self, doc: dict) -> str | None:
        text = doc["text"]
        ids, starts, ends = _token_hashes(text)
        grams = ngram_hashes(ids, self.n)
        hit = np.flatnonzero(np.isin(grams, self.grams))
        if len(hit) == 0:
            return None
        doc["meta"]["contaminated_ngrams"] = len(hit)
        if self.action == "drop":
            return "contaminated"
        # Character ranges to remove: each colliding n-gram widened by `window` on each side.
        cut_from = np.maximum(starts[hit] - self.window, 0)
        cut_to = ends[hit + self.n - 1] + self.window
        pieces, pos = [], 0
        for a, b in zip(cut_from.tolist(), cut_to.tolist()):
            if a > pos:
                pieces.append(text[pos:a])
            pos = max(pos, b)
        pieces.append(text[pos:])
        pieces = [p.strip() for p in pieces if p.strip()]
        if len(pieces) > self.max_pieces or not pieces:
            return "contaminated"
        doc["text"] = "\n\n".join(pieces)
        return None
