"""BM25 ranking (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and
Beyond") and paragraph passages from a folder: shared by similarity-based demonstration selection
in prompting.py and by the retrieval tool in tools.py."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError

# Words of letters/digits; each CJK character is a term of its own, since Chinese has no spaces.
_TERM = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)
PASSAGE_SUFFIXES = (".txt", ".md")


def terms(text: str) -> list[str]:
    """Lower-cased terms of a text (words, single CJK characters)."""
    return _TERM.findall(text.lower())


class BM25:
    """Okapi BM25 over a fixed list of documents.

    score(q, d) = sum over query terms t of idf(t) * f(t,d) (k1 + 1) / (f(t,d) + k1 (1 - b + b |d|/avgdl))
    with idf(t) = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5)), the Robertson-Spärck Jones weight
    shifted by one (as Lucene does) so that a term in most documents never scores negative.
    """

    def __init__(self, documents: Sequence[str], *, k1: float = 1.5, b: float = 0.75) -> None:
        if not documents:
            raise LmforgeError("BM25 needs at least one document")
        self.k1, self.b = k1, b
        self.docs = [Counter(terms(d)) for d in documents]
        self.lengths = [sum(c.values()) for c in self.docs]
        self.avgdl = max(sum(self.lengths) / len(self.docs), 1e-9)
        df = Counter(t for c in self.docs for t in c)
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - m + 0.5) / (m + 0.5)) for t, m in df.items()}

    def scores(self, query: str) -> list[float]:
        """The score of every document for `query` (a repeated query term counts each time)."""
        out = []
        for doc, length in zip(self.docs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avgdl)
            s = 0.0
            for t in terms(query):
                if f := doc.get(t, 0):
                    s += self.idf[t] * f * (self.k1 + 1) / (f + norm)
            out.append(s)
        return out

    def top(self, query: str, k: int) -> list[tuple[int, float]]:
        """(index, score) of the k best documents, best first; ties keep document order."""
        ranked = sorted(enumerate(self.scores(query)), key=lambda p: -p[1])
        return ranked[:k]


@dataclass(frozen=True)
class Passage:
    source: str  # file path relative to the folder
    text: str


def load_passages(folder: str | Path) -> list[Passage]:
    """Paragraphs (blocks separated by blank lines) of every .txt/.md file under `folder`."""
    root = Path(folder)
    if not root.is_dir():
        raise LmforgeError(f"retrieval folder {root} does not exist or is not a directory")
    passages = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in PASSAGE_SUFFIXES or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in re.split(r"\n\s*\n", text):
            if block.strip():
                passages.append(Passage(str(path.relative_to(root)), " ".join(block.split())))
    if not passages:
        raise LmforgeError(f"retrieval folder {root} has no .txt or .md text to search")
    return passages


class PassageIndex:
    """The paragraphs of a folder, ranked for a query by BM25, or with `embed` (texts -> unit
    vectors, e.g. lmforge.adapt.contrastive.Embedder) by cosine similarity of sentence
    embeddings (dense retrieval, Karpukhin et al. 2020), which also matches paraphrases that
    share no words with the query."""

    def __init__(self, folder: str | Path, embed=None) -> None:
        self.passages = load_passages(folder)
        self.bm25 = BM25([p.text for p in self.passages])
        self.embed = embed
        self.vectors = embed([p.text for p in self.passages]) if embed is not None else None

    def search(self, query: str, k: int = 1) -> list[Passage]:
        if self.vectors is None:
            return [self.passages[i] for i, s in self.bm25.top(query, k) if s > 0]
        scores = self.vectors @ self.embed([query])[0]
        return [self.passages[i] for i in scores.argsort()[::-1][:k]]
