"""Data mixture (seed 002 §4.1.3): sample each source to a target share of the corpus, by
documents, characters or tokens, with a per-source cap on epochs (how many times its data may be
repeated; Muennighoff et al. 2023 find up to ~4 epochs nearly as good as fresh data).

Tokens are counted with the tokenizer the model will be trained with when one is given (a
`tokenizer.json` or an lmforge tokenizer directory): sources differ in tokens per word (code,
Chinese, numbers), so word shares are not token shares. Without one, words (each CJK character
one word) stand in, and the plan says so (`unit: words`).

The largest mix that meets the targets without exceeding any cap is taken: total T =
min_s(cap_s * available_s / weight_s), optionally capped by `total`; source s is then sampled at
rate r_s = weight_s * T / available_s, each document kept floor(r_s) times plus once more with
probability frac(r_s), decided by a hash of its id so every run and task agrees.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lmforge.data.filters import token_count
from lmforge.errors import LmforgeError


class _SizeCollector:
    def __init__(self, size: Callable[[dict], int]) -> None:
        self.size, self.sources, self.sizes = size, [], []

    def add(self, doc: dict) -> None:
        self.sources.append(str(doc.get("source", "")))
        self.sizes.append(self.size(doc))

    def result(self) -> dict[str, np.ndarray]:
        return {"sources": np.asarray(self.sources, dtype=str), "sizes": np.asarray(self.sizes)}


class Mixture:
    """Pipeline step: resample sources to `weights` ({source: share}); sources not named are
    dropped. A source name matches a document's `source` exactly or as a path prefix."""

    def __init__(
        self,
        weights: dict[str, float] | None = None,
        unit: str = "tokens",
        max_epochs: float | dict[str, float] = 1.0,
        total: float = 0,
        seed: int = 0,
        tokenizer: str = "",
    ) -> None:
        if not weights or any(w <= 0 for w in weights.values()):
            raise ValueError("mixture: `weights` must map each source to a positive share")
        if unit not in ("documents", "characters", "tokens"):
            raise ValueError(f"mixture: unit must be documents, characters or tokens, not {unit!r}")
        norm = sum(weights.values())
        self.weights = {k: v / norm for k, v in weights.items()}
        caps = max_epochs if isinstance(max_epochs, dict) else {}
        default = 1.0 if isinstance(max_epochs, dict) else float(max_epochs)
        self.caps = {s: float(caps.get(s, default)) for s in self.weights}
        self.unit, self.total, self.seed = unit, total, seed
        self._encode = None
        if tokenizer:
            if unit != "tokens":
                raise ValueError(f"mixture: a tokenizer counts tokens; unit is {unit!r}")
            if not Path(tokenizer).exists():
                raise ValueError(f"mixture: tokenizer {tokenizer} does not exist")
            from lmforge.tokenizer import Tokenizer

            try:
                self._encode = Tokenizer.load(tokenizer).encode
            except LmforgeError as e:
                raise ValueError(f"mixture: {e}") from None
        # The unit sizes are really counted in: "words" when tokens are asked for without a
        # tokenizer to count them.
        self.counted_in = "words" if unit == "tokens" and self._encode is None else unit
        self.tokenizer = tokenizer
        self.plan: dict = {}

    def size(self, doc: dict) -> int:
        """The document's size in `counted_in` units."""
        if self.counted_in == "documents":
            return 1
        if self.counted_in == "characters":
            return len(doc["text"])
        if self._encode is not None:
            return len(self._encode(doc["text"]))
        return token_count(doc["text"])

    def group(self, source: str) -> str | None:
        for name in self.weights:
            if source == name or source.startswith(name.rstrip("/") + "/"):
                return name
        return None

    def collector(self) -> _SizeCollector:
        return _SizeCollector(self.size)

    def decide(self, collected: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        available: Counter = Counter()
        for c in collected:
            for source, size in zip(c["sources"].tolist(), c["sizes"].tolist()):
                group = self.group(source)
                if group is not None:
                    available[group] += size
        missing = [s for s in self.weights if not available[s]]
        if missing:
            raise ValueError(f"mixture: no data for source(s) {', '.join(missing)}")
        total = min(self.caps[s] * available[s] / w for s, w in self.weights.items())
        total = min(total, self.total) if self.total else total
        rates = {s: w * total / available[s] for s, w in self.weights.items()}
        self.plan = {
            "unit": self.counted_in,
            "tokenizer": self.tokenizer or None,
            "available": dict(available),
            "rates": rates,
            "target_total": total,
        }
        names = sorted(rates)
        table = np.asarray([rates[s] for s in names])
        return [{"rate": table, "names": np.asarray(names, dtype=str)} for _ in collected]

    def apply(self, doc: dict, index: int, decision: dict) -> tuple[list[dict], str | None]:
        group = self.group(str(doc.get("source", "")))
        if group is None:
            return [], "mixture_source_not_listed"
        names = decision["names"].tolist()
        rate = float(decision["rate"][names.index(group)])
        key = f"{self.seed}:{doc.get('id')}:{index}".encode()
        u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2**64
        copies = int(rate) + (u < rate - int(rate))
        if copies == 0:
            return [], "mixture_sampled_out"
        out = [doc]
        for epoch in range(1, copies):
            out.append({**doc, "id": f"{doc.get('id')}#{epoch}", "meta": dict(doc["meta"])})
        return out, None
