"""Sentence embeddings and contrastive training (seed 001: 自监督对比学习, 负采样).

An `Embedder` mean-pools a model's final hidden states over the real tokens and L2-normalises
them, as Sentence-BERT (Reimers & Gurevych 2019) and all-MiniLM-L6-v2 do. Training pulls each
anchor towards its positive and away from the other positives in the batch with InfoNCE
(Oord et al. 2018): SimCSE (Gao et al. 2021) unsupervised (two dropout views of one sentence) or
supervised (paraphrase pairs, optionally with a mined hard negative each).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import field_
from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.retrieval import BM25


class Embedder:
    """Texts -> unit vectors: mean of the final hidden states over non-pad tokens, normalised."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        batch_size: int = 64,
        max_len: int = 256,
        device: str | torch.device | None = None,
    ) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = torch.device(device) if device else next(model.parameters()).device
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        if cls is not None and sep is not None:  # BERT-style: [CLS] text [SEP], as in pre-training
            self.prefix, self.suffix = [cls], [sep]
        else:
            self.prefix, self.suffix = ([tokenizer.bos_id] if tokenizer.adds_bos else []), []
        # sentence-transformers cuts at max_seq_length (256 for all-MiniLM-L6-v2), specials included.
        self.max_len = min(max_len, model.config.max_seq_len)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    @property
    def dimension(self) -> int:
        return self.model.config.d_model

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        room = self.max_len - len(self.prefix) - len(self.suffix)
        encoded = self.tokenizer.encode_batch(list(texts))
        return [self.prefix + ids[:room] + self.suffix for ids in encoded]

    def embed_tokens(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, d_model) normalised embeddings of tokenized texts, with gradients if enabled."""
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):  # right padding: causal models never see the pads either
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        if self.model.config.arch == "encoder":  # skips the MLM head: only hidden states needed
            hidden = self.model.encode(input_ids, attention_mask=mask)
        else:
            _, hidden = self.model(input_ids, attention_mask=mask, return_hidden=True)
        return mean_pool(hidden, mask)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Differentiable embeddings of one batch of texts (for training)."""
        return self.embed_tokens(self.tokenize(texts))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(N, d_model) float32 embeddings, in input order."""
        ids = self.tokenize(texts)
        # Longest first, so each batch pads to similar lengths (as sentence-transformers does).
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = np.zeros((len(ids), self.dimension), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                vectors = self.embed_tokens([ids[i] for i in chunk]).float().cpu().numpy()
                out[chunk] = vectors
        self.model.train(was_training)
        return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, T, d) over positions where mask (B, T) is 1, L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=-1)


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
) -> torch.Tensor:
    """InfoNCE over in-batch negatives (Oord et al. 2018): anchor i must pick positive i among
    all positives and all hard negatives (SimCSE eq. 5), by cosine / temperature."""
    candidates = positives if negatives is None else torch.cat([positives, negatives])
    logits = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(anchors), device=anchors.device))


@dataclass
class Pair:
    """A training example: anchor, a positive (itself, for unsupervised SimCSE), a hard negative."""

    anchor: str
    positive: str
    negative: str | None = None


def with_dropout(model: nn.Module, p: float = 0.1) -> nn.Module:
    """The same weights in a model whose config has dropout p: unsupervised SimCSE's two views
    differ only by dropout masks, and HF checkpoints load with dropout 0."""
    if model.config.dropout == p:
        return model
    twin = type(model)(dataclasses.replace(model.config, dropout=p))
    twin.load_state_dict(model.state_dict())
    param = next(model.parameters())
    return twin.to(device=param.device, dtype=param.dtype)


def mine_hard_negatives(
    pairs: Sequence[Pair],
    method: Literal["bm25", "model"] = "bm25",
    embedder: Embedder | None = None,
) -> list[Pair]:
    """Give every pair the most similar other positive as its hard negative (负采样): by BM25
    score or by the current model's cosine similarity to the anchor."""
    candidates = [p.positive for p in pairs]
    if method == "bm25":
        index = BM25(candidates)
        scores = np.array([index.scores(p.anchor) for p in pairs])
    elif method == "model":
        if embedder is None:
            raise ConfigError("hard-negative mining with method 'model' needs an embedder")
        scores = embedder([p.anchor for p in pairs]) @ embedder(candidates).T
    else:
        raise ConfigError(f"unknown hard-negative method {method!r}: use 'bm25' or 'model'")
    mined = []
    for i, p in enumerate(pairs):
        ranked = np.argsort(-scores[i], kind="stable")
        j = next((int(j) for j in ranked if candidates[j] != p.positive), None)
        mined.append(Pair(p.anchor, p.positive, None if j is None else candidates[j]))
    return mined


def train_contrastive(
    embedder: Embedder,
    pairs: Sequence[Pair],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-5,
    temperature: float = 0.05,
    seed: int = 0,
) -> list[float]:
    """Train `embedder.model` with InfoNCE on shuffled batches of pairs; returns the step losses.

    Unsupervised SimCSE: pass Pair(text, text) and a model with dropout > 0 (`with_dropout`); the
    two forward passes draw different dropout masks, so each sentence is its own positive.
    """
    if len(pairs) < 2:
        raise LmforgeError(f"contrastive training needs at least 2 pairs, got {len(pairs)}")
    unsupervised = any(p.anchor == p.positive for p in pairs)
    if unsupervised and not embedder.model.config.dropout:
        raise ConfigError(
            "unsupervised SimCSE needs dropout > 0 (identical views give no signal): "
            "wrap the model with with_dropout(model, 0.1)"
        )
    rng = random.Random(seed)
    model = embedder.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    order: list[int] = []
    losses = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(pairs)), len(pairs))
        batch = [pairs[i] for i in order[:batch_size]]
        del order[:batch_size]
        anchors = embedder.embed([p.anchor for p in batch])
        positives = embedder.embed([p.positive for p in batch])
        # Hard negatives only when every example has one, so the candidate set stays aligned.
        negs = [p.negative for p in batch]
        negatives = embedder.embed(negs) if all(n is not None for n in negs) else None
        loss = info_nce(anchors, positives, negatives, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@dataclass
class EmbedConfig:
    """Embed every text of a file with a model: mean-pooled, L2-normalised vectors (.npy)."""

    model: str = field_("", "model checkpoint (lmforge, Hugging Face directory, or GGUF)")
    input: str = field_("", "texts: a .txt file (one per line) or .jsonl (one object a line)")
    out: str = field_("vectors.npy", "output .npy; a .json with model and dimension goes beside")
    text_field: str = field_("text", "the key holding the text in a .jsonl input")
    batch_size: int = field_(64, "texts per forward pass", ge=1)
    max_len: int = field_(
        256, "longest text in tokens (specials included); longer ones are cut", ge=2
    )
    device: str = field_("auto", "auto, cpu, cuda, mps")


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Texts from a .txt file (one a line, blank lines skipped) or a .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"embed: no input file {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(lines, 1):
            try:
                value = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LmforgeError(
                    f"{path}:{n}: not a JSON object with a {text_field!r} key"
                ) from None
            if not isinstance(value, str):
                raise LmforgeError(f"{path}:{n}: {text_field!r} is not a string")
            texts.append(value)
        lines = texts
    if not lines:
        raise LmforgeError(f"embed: {path} holds no texts")
    return lines


def embed_command(config: EmbedConfig) -> dict:
    """Write config.out (N, dimension) float32 vectors and a .json describing them."""
    from lmforge.loading import load, load_tokenizer
    from lmforge.train.trainer import resolve_device

    c = config
    if not c.model or not c.input:
        raise ConfigError("embed: --model and --input are required")
    texts = read_texts(c.input, c.text_field)
    device = resolve_device(c.device)
    model = load(c.model).to(device)
    embedder = Embedder(model, load_tokenizer(c.model), batch_size=c.batch_size, max_len=c.max_len)
    vectors = embedder(texts)
    out = Path(c.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, vectors)
    info = {
        "model": c.model,
        "dimension": embedder.dimension,
        "count": len(texts),
        "pooling": "mean",
        "normalized": True,
        "max_len": embedder.max_len,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info
