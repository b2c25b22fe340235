"""Tiny token-shard directories for pretrain tests, written in the documented format directly."""

import json

import numpy as np


def write_pattern_shards(directory, vocab=64, tokens=20_000, seed=0):
    """Runs of consecutive ids with random restarts: learnable, and cheap to write."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", tokens), ("validation", tokens // 10)):
        starts = rng.integers(0, vocab, size=n // 16 + 1)
        ids = ((starts[:, None] + np.arange(16)) % vocab).reshape(-1)[:n].astype(np.uint16)
        ids.tofile(directory / f"{split}_00000.bin")
        splits[split] = [{"file": f"{split}_00000.bin", "tokens": n, "documents": 1}]
    index = {
        "format": "lmforge-shards",
        "version": 1,
        "dtype": "uint16",
        "vocab_size": vocab,
        "bos_id": None,
        "eos_id": 0,
        "splits": splits,
    }
    (directory / "index.json").write_text(json.dumps(index))
    return directory
