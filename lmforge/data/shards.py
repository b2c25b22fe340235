"""Token shards: documents tokenized once into flat uint16/uint32 `.bin` files plus `index.json`.

Training reads them by memory map; every batch is a pure function of (seed, step, micro_step), so a
resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import CorpusError, LmforgeError
from lmforge.tokenizer import Tokenizer

FORMAT = "lmforge-shards"
VERSION = 1
SPLITS = ("train", "validation")


def write_shards(
    documents: Iterable[dict | str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    shard_tokens: int = 2**26,
    batch_docs: int = 512,
    overwrite: bool = False,
) -> dict:
    """Tokenize `documents` (BOS, if the tokenizer has one, before each and EOS after) into
    train/validation shards; return the index.

    A document goes to validation when the hash of (seed, id or ordinal) falls below val_fraction;
    if none does and there are two or more documents, the one with the smallest hash goes there.
    """
    out_dir = Path(out_dir)
    if tokenizer.eos_id is None:
        raise LmforgeError("the tokenizer has no EOS token, which separates documents in shards")
    if not 0 <= val_fraction < 1:
        raise LmforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    _check_replaceable(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    # Build beside out_dir (same filesystem) so that the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        writers = {split: _SplitWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
        try:
            _tokenize_into(writers, documents, tokenizer, val_fraction, seed, batch_docs)
        finally:
            splits = {split: writer.close() for split, writer in writers.items()}
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "tokenizer_sha256": tokenizer.sha256,
            "seed": seed,
            "val_fraction": val_fraction,
            "splits": splits,
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not overwrite:
        raise LmforgeError(
            f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    if not (out_dir / "index.json").is_file():
        # overwrite deletes the old directory: only ever do that to a previous shard directory.
        raise LmforgeError(f"refusing to overwrite {out_dir}: it has no index.json of token shards")


def _replace_dir(new: Path, out_dir: Path) -> None:
    """Move `new` to `out_dir`; an old `out_dir` is removed only once the new one is in place."""
    if out_dir.exists():
        old = new.with_suffix(".old")
        os.replace(out_dir, old)
        os.replace(new, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(new, out_dir)


class _SplitWriter:
    """Appends documents to `{split}_00000.bin`, starting a new file once one holds shard_tokens."""

    def __init__(self, directory: Path, split: str, dtype: type, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.file = None

    def add(self, ids: list[int]) -> tuple[int, int]:
        """Append one document; return its (shard number, token offset)."""
        if self.file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self._open_next()
        shard = self.shards[-1]
        offset = shard["tokens"]
        self.file.write(np.asarray(ids, dtype=self.dtype).tobytes())
        shard["tokens"] += len(ids)
        shard["documents"] += 1
        return len(self.shards) - 1, offset

    def remove(self, number: int, offset: int, length: int) -> np.ndarray:
        """Cut one document out of a finished shard and return its tokens."""
        self._close_file()
        shard = self.shards[number]
        path = self.directory / shard["file"]
        # Loads one shard; this only runs on corpora whose validation split came out empty.
        tokens = np.fromfile(path, dtype=self.dtype)
        np.concatenate([tokens[:offset], tokens[offset + length :]]).tofile(path)
        shard["tokens"] -= length
        shard["documents"] -= 1
        if shard["documents"] == 0:
            path.unlink()
            del self.shards[number]
            for i, later in enumerate(self.shards[number:], number):
                name = f"{self.split}_{i:05d}.bin"
                (self.directory / later["file"]).rename(self.directory / name)
                later["file"] = name
        return tokens[offset : offset + length]

    def close(self) -> list[dict]:
        self._close_file()
        return self.shards

    def _open_next(self) -> None:
        self._close_file()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.file = open(self.directory / name, "wb", buffering=1 << 20)  # noqa: SIM115
        self.shards.append({"file": name, "tokens": 0, "documents": 0})

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _tokenize_into(
    writers: dict[str, _SplitWriter],
    documents: Iterable[dict | str],
    tokenizer: Tokenizer,
    val_fraction: float,
    seed: int,
    batch_docs: int,
) -> None:
    lowest: tuple[float, int, int, int] | None = None  # (score, shard, offset, length) in train
    # BOS opens each document (as Llama trains) when the tokenizer has one, so a prompt that starts
    # with BOS at generation time is in distribution; EOS always closes it.
    add_bos = tokenizer.bos_id is not None

    def flush(batch: list[tuple[str, str]]) -> None:
        nonlocal lowest
        encoded = tokenizer.encode_batch([t for t, _ in batch], add_bos=add_bos, add_eos=True)
        for (_, key), ids in zip(batch, encoded, strict=True):
            score = _split_score(seed, key)
            if score < val_fraction:
                writers["validation"].add(ids)
            else:
                number, offset = writers["train"].add(ids)
                if lowest is None or score < lowest[0]:
                    lowest = (score, number, offset, len(ids))

    batch: list[tuple[str, str]] = []
    for ordinal, doc in enumerate(documents):
        text, key = _text_and_key(doc, ordinal)
        if text:
            batch.append((text, key))
        if len(batch) >= batch_docs:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    train, validation = writers["train"], writers["validation"]
    n_train = sum(shard["documents"] for shard in train.shards)
    if n_train == 0 and not validation.shards:
        raise CorpusError("no non-empty documents to write into token shards")
    if val_fraction > 0 and not validation.shards and n_train >= 2:
        validation.add(train.remove(*lowest[1:]).tolist())


def _text_and_key(doc: dict | str, ordinal: int) -> tuple[str, str]:
    """The text of a document and the key its split is decided by: its id, else its ordinal."""
    if isinstance(doc, str):
        return doc, f"#{ordinal}"
    if not isinstance(doc.get("text"), str):
        raise CorpusError(f"document {ordinal} has no 'text' string (keys: {', '.join(doc)})")
    return doc["text"], f"#{ordinal}" if doc.get("id") is None else str(doc["id"])


def _split_score(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, key): stable across runs, batch sizes, machines."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def read_index(directory: str | Path) -> dict:
    """Load and check `index.json` of a shard directory."""
    path = Path(directory) / "index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorpusError(f"{path} not found: {directory} is not a token-shard directory") from None
    except (OSError, ValueError) as e:
        raise CorpusError(f"{path} is corrupt: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CorpusError(f"{path} is not an index of {FORMAT} (written by another tool?)")
    if index.get("version") != VERSION:
        raise CorpusError(
            f"{path} has version {index.get('version')}; this lmforge reads {VERSION}"
        )
    if index.get("dtype") not in ("uint16", "uint32") or not isinstance(index.get("splits"), dict):
        raise CorpusError(f"{path} is corrupt: bad dtype or splits")
    return index


class TokenShards:
    """One split of a shard directory, memory-mapped: random training batches and eval windows."""

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        directory = Path(directory)
        self.index = read_index(directory)
        self.split = split
        if split not in self.index["splits"]:
            raise CorpusError(
                f"{directory} has no split {split!r} ({', '.join(self.index['splits'])})"
            )
        dtype = np.dtype(self.index["dtype"])
        self.shards: list[np.memmap] = []
        for shard in self.index["splits"][split]:
            path = directory / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                found = "is missing" if size is None else f"has {size} bytes"
                raise CorpusError(
                    f"{path} {found} but index.json says {shard['tokens']} tokens ({expected} "
                    "bytes): the shard is truncated or corrupt; rebuild the shards"
                )
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.index["eos_id"]

    def get_batch(
        self, batch_size: int, seq_len: int, *, seed: int, step: int, micro_step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows (x, y = x shifted by one), a pure function of (seed, step, micro_step)."""
        # Every window of seq_len + 1 tokens inside one shard is equally likely, so shards are
        # drawn in proportion to their length and no window straddles two unrelated files.
        starts = np.maximum(self.lengths - seq_len, 0)
        self._check_fits(seq_len, starts.sum())
        rng = np.random.default_rng([seed, step, micro_step])
        picks = rng.integers(0, starts.sum(), size=batch_size)
        bounds = np.cumsum(starts)
        which = np.searchsorted(bounds, picks, side="right")
        offsets = picks - (bounds[which] - starts[which])
        window = np.arange(seq_len + 1)
        tokens = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for shard in np.unique(which):
            rows = which == shard
            tokens[rows] = self.shards[shard][offsets[rows][:, None] + window]
        return _split_xy(tokens)

    def eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive windows from the start of the split; each token is a target at most once."""
        self._check_fits(seq_len, sum(max(n - seq_len, 0) for n in self.lengths))
        # Windows overlap by one token so that targets tile the shard without gaps or repeats.
        windows = (
            (shard, start)
            for shard, n in enumerate(self.lengths)
            for start in range(0, n - seq_len, seq_len)
        )
        produced = 0
        while max_batches is None or produced < max_batches:
            chunk = list(itertools.islice(windows, batch_size))
            if not chunk:
                return
            tokens = np.stack([self.shards[s][i : i + seq_len + 1] for s, i in chunk])
            yield _split_xy(tokens.astype(np.int64))
            produced += 1

    def _check_fits(self, seq_len: int, n_windows: int) -> None:
        if n_windows == 0:
            raise CorpusError(
                f"the {self.split!r} split has {self.n_tokens} tokens (longest shard "
                f"{self.lengths.max(initial=0)}); it needs more than seq_len={seq_len} tokens in "
                "one shard: add data or lower seq_len"
            )


def _split_xy(tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    both = torch.from_numpy(tokens)
    return both[:, :-1].contiguous(), both[:, 1:].contiguous()


def unigram_entropy(directory: str | Path, split: str = "train") -> float:
    """Entropy in nats/token of the split's token frequencies: the loss of a unigram model."""
    shards = TokenShards(directory, split)
    counts = np.zeros(shards.vocab_size, dtype=np.int64)
    for shard in shards.shards:
        # Chunks keep the int64 copy that bincount makes small.
        for start in range(0, len(shard), 1 << 24):
            counts += np.bincount(shard[start : start + (1 << 24)], minlength=shards.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
