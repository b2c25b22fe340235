"""Model-based quality filters (seed 002 §4.1.2): a metric filter (perplexity under a small
n-gram language model trained on reference text, as CCNet does with KenLM on Wikipedia) and a
classifier filter (hashed n-gram logistic regression, reference text vs candidates, as GPT-3).

Both train in seconds on the default corpus; reference and candidate texts are any corpus paths
(`default` is Python's documentation, lmforge's offline corpus).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import scipy.optimize
import scipy.sparse

from lmforge.data.decontaminate import _token_hashes, ngram_hashes


def reference_texts(paths: Sequence[str], limit: int = 0) -> list[str]:
    """Texts of corpus `paths`; the name `default` stands for lmforge's offline corpus."""
    from lmforge.data.default_corpus import default_documents
    from lmforge.data.sources import iter_documents

    texts: list[str] = []
    for path in paths:
        docs = default_documents() if path == "default" else iter_documents(path)
        texts += [d["text"] for d in docs]
    return texts[:limit] if limit else texts


class _Counts:
    """Sorted hashes with counts: lookups by binary search, all vectorised."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys, self.counts = np.unique(keys, return_counts=True)

    def __getitem__(self, query: np.ndarray) -> np.ndarray:
        i = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        return np.where(self.keys[i] == query, self.counts[i], 0) if len(self.keys) else query * 0


class NgramLM:
    """Interpolated absolute-discounting word n-gram model (Ney et al. 1994; KenLM's modified
    Kneser-Ney adds continuation counts, which matter little for ranking documents). D = 0.75."""

    def __init__(self, texts: Sequence[str], order: int = 3, discount: float = 0.75) -> None:
        self.order, self.d = order, discount
        self.grams: list[_Counts] = []  # k-gram counts, k = 1..order
        self.contexts: list[_Counts] = []  # (k-1)-gram counts as contexts of k-grams
        self.followers: list[_Counts] = []  # distinct words after each (k-1)-gram context
        seqs = [self._ids(t) for t in texts]
        for k in range(1, order + 1):
            grams = [ngram_hashes(s, k) for s in seqs]
            ctx = [
                ngram_hashes(s[:-1], k - 1) if k > 1 else np.zeros(len(s), np.uint64) for s in seqs
            ]
            g, c = np.concatenate(grams), np.concatenate(ctx)
            self.grams.append(_Counts(g))
            self.contexts.append(_Counts(c))
            pairs = np.unique(np.stack([c, g], axis=1), axis=0) if len(g) else np.zeros((0, 2))
            self.followers.append(_Counts(pairs[:, 0].astype(np.uint64)))
        self.n_tokens = int(self.grams[0].counts.sum())
        self.vocab = len(self.grams[0].keys)

    @staticmethod
    def _ids(text: str) -> np.ndarray:
        return _token_hashes(text)[0]

    def log_probs(self, text: str) -> np.ndarray:
        """Natural-log probability of each token given up to order-1 previous tokens."""
        ids = self._ids(text)
        if len(ids) == 0:
            return np.zeros(0)
        # Unigram: add-one over the vocabulary plus one unknown word.
        p = (self.grams[0][ids] + 1.0) / (self.n_tokens + self.vocab + 1)
        for k in range(2, self.order + 1):
            g = np.concatenate([np.zeros(k - 1, np.uint64), ngram_hashes(ids, k)])
            c = np.concatenate([np.zeros(k - 1, np.uint64), ngram_hashes(ids[:-1], k - 1)])
            have = np.arange(len(ids)) >= k - 1
            cg, cc = self.grams[k - 1][g], self.contexts[k - 1][c]
            nf = self.followers[k - 1][c]
            seen = have & (cc > 0)
            safe = np.maximum(cc, 1)
            higher = np.maximum(cg - self.d, 0) / safe + self.d * nf / safe * p
            p = np.where(seen, higher, p)
        return np.log(p)

    def perplexity(self, text: str) -> float:
        lp = self.log_probs(text)
        return float(np.exp(-lp.mean())) if len(lp) else float("inf")


class PerplexityFilter:
    """Keep documents whose perplexity lies in [min_perplexity, max_perplexity]; or, with
    `keep_percentiles: [lo, hi]`, in that band of the reference texts' own perplexities."""

    def __init__(
        self,
        reference: list[str] | None = None,
        order: int = 3,
        max_perplexity: float = 0,
        min_perplexity: float = 0,
        keep_percentiles: list[float] | None = None,
        max_reference_docs: int = 2000,
    ) -> None:
        texts = reference_texts(reference or ["default"], max_reference_docs)
        held = texts[::10]
        self.lm = NgramLM([t for i, t in enumerate(texts) if i % 10], order)
        self.low, self.high = min_perplexity, max_perplexity or float("inf")
        if keep_percentiles:
            ppl = [self.lm.perplexity(t) for t in held if t.strip()]
            self.low, self.high = (float(np.percentile(ppl, q)) for q in keep_percentiles)

    def __call__(self, doc: dict) -> str | None:
        ppl = self.lm.perplexity(doc["text"])
        doc["meta"]["perplexity"] = round(ppl, 2)
        if ppl < self.low:
            return "perplexity_too_low"
        return "perplexity_too_high" if ppl > self.high else None


def hashed_features(texts: Sequence[str], dim: int = 1 << 18) -> scipy.sparse.csr_matrix:
    """Binary bag of word unigrams and bigrams, hashed into `dim` columns (the hashing trick)."""
    rows, cols = [], []
    for r, text in enumerate(texts):
        ids = _token_hashes(text)[0]
        feats = np.unique(np.concatenate([ngram_hashes(ids, 1), ngram_hashes(ids, 2)]) % dim)
        rows.append(np.full(len(feats), r))
        cols.append(feats.astype(np.int64))
    row, col = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (rows, cols))
    data = np.ones(len(row), dtype=np.float32)
    return scipy.sparse.csr_matrix((data, (row, col)), shape=(len(texts), dim))


class QualityClassifier:
    """Logistic regression on hashed n-grams, L2-regularised, fitted with L-BFGS."""

    def __init__(self, positive: Sequence[str], negative: Sequence[str], l2: float = 1e-3):
        x = hashed_features([*positive, *negative])
        # Row-normalise so long documents do not dominate.
        norms = np.sqrt(np.asarray(x.sum(axis=1)).ravel()) + 1e-9
        x = scipy.sparse.diags(1 / norms) @ x
        y = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])

        def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
            z = x @ w[:-1] + w[-1]
            p = 1 / (1 + np.exp(-z))
            nll = np.logaddexp(0, z) - y * z
            g = p - y
            grad = np.concatenate([x.T @ g / len(y) + l2 * w[:-1], [g.mean()]])
            return float(nll.mean() + 0.5 * l2 * w[:-1] @ w[:-1]), grad

        w0 = np.zeros(x.shape[1] + 1)
        self.w = scipy.optimize.minimize(loss, w0, jac=True, method="L-BFGS-B").x

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Probability that each text looks like the reference (positive) set."""
        x = hashed_features(texts)
        norms = np.sqrt(np.asarray(x.sum(axis=1)).ravel()) + 1e-9
        z = (scipy.sparse.diags(1 / norms) @ x) @ self.w[:-1] + self.w[-1]
        return 1 / (1 + np.exp(-z))


class ClassifierFilter:
    """Keep documents with score >= `threshold`, or (`pareto: true`) keep with GPT-3's rule
    np.random.pareto(alpha) > 1 - score, alpha = 9 (Brown et al. 2020, appendix A), which keeps
    mostly high scores and some low ones for diversity; the draw is seeded by the document id."""

    def __init__(
        self,
        negative: list[str] | None = None,
        positive: list[str] | None = None,
        threshold: float = 0.5,
        pareto: bool = False,
        alpha: float = 9.0,
        max_docs: int = 2000,
    ) -> None:
        if not negative:
            raise ValueError("classifier: give `negative`, paths of candidate (unfiltered) text")
        pos = reference_texts(positive or ["default"], max_docs)
        neg = reference_texts(negative, max_docs)
        self.model = QualityClassifier(pos, neg)
        self.threshold, self.pareto, self.alpha = threshold, pareto, alpha

    def __call__(self, doc: dict) -> str | None:
        score = float(self.model.score([doc["text"]])[0])
        doc["meta"]["quality_score"] = round(score, 4)
        if self.pareto:
            seed = int.from_bytes(
                hashlib.blake2b(str(doc.get("id")).encode()).digest()[:8], "little"
            )
            keep = np.random.default_rng(seed).pareto(self.alpha) > 1 - score
            return None if keep else "classifier_pareto"
        return None if score >= self.threshold else "classifier_low_score"
