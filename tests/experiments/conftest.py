import json

import numpy as np
import pytest


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Token shards of runs of consecutive ids (a learnable pattern), vocabulary 64."""
    directory = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 40_000), ("validation", 4_000)):
        starts = rng.integers(0, 64, size=n // 16 + 1)
        ids = ((starts[:, None] + np.arange(16)) % 64).reshape(-1)[:n].astype(np.uint16)
        ids.tofile(directory / f"{split}_00000.bin")
        splits[split] = [{"file": f"{split}_00000.bin", "tokens": n, "documents": 1}]
    index = {
        "format": "lmforge-shards",
        "version": 1,
        "dtype": "uint16",
        "vocab_size": 64,
        "bos_id": None,
        "eos_id": 0,
        "splits": splits,
    }
    (directory / "index.json").write_text(json.dumps(index))
    return directory
