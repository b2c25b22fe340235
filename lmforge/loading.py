"""`lmforge.load(path)`: one entry point for every supported model source."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import CheckpointError
from lmforge.model import Transformer


def resolve(path: str | Path) -> tuple[str, Path]:
    """(kind, directory) for a path: kind is "lmforge" or "hf". A run directory resolves to its
    final model, or else to its latest training checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if p.is_dir():
        if (p / "config.yaml").is_file():
            return "lmforge", p
        if (p / "config.json").is_file():
            return "hf", p
        if (p / "model" / "config.yaml").is_file():
            return "lmforge", p / "model"
        latest = p / "checkpoints" / "latest"
        if latest.is_file():
            return "lmforge", p / "checkpoints" / latest.read_text().strip()
    raise CheckpointError(
        f"{p} is not a model: expected an lmforge checkpoint (config.yaml), a Hugging Face "
        "directory (config.json) or a run directory"
    )


def load(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """A ready model in eval mode from an lmforge checkpoint, run or Hugging Face directory."""
    kind, directory = resolve(path)
    if kind == "hf":
        from lmforge.interop.hf import load_hf

        return load_hf(directory, device=device, dtype=dtype)
    from lmforge.train.checkpoint import load_model

    return load_model(directory, device=device, dtype=dtype)


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside a model (tokenizer.json), for any source `load` accepts."""
    from lmforge.tokenizer import Tokenizer

    _, directory = resolve(path)
    return Tokenizer.load(directory)
