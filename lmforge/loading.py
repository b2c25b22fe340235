"""`lmforge.load(path)`: one entry point for every supported model source."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import CheckpointError
from lmforge.model import Transformer


def _smollm2() -> str:
    from lmforge.interop.gguf import smollm2_path

    return smollm2_path()


# Names that stand for a model file a Python package ships, usable wherever a path is.
PACKAGED_MODELS = {"smollm2": _smollm2}


def resolve(path: str | Path) -> tuple[str, Path]:
    """(kind, path) for a model path: kind is "lmforge", "hf" (both directories) or "gguf" (a
    file). A run directory resolves to its final model, or else to its latest checkpoint."""
    p = Path(path)
    if not p.exists() and str(path) in PACKAGED_MODELS:
        p = Path(PACKAGED_MODELS[str(path)]())
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if p.is_file():
        from lmforge.interop.gguf import is_gguf

        if is_gguf(p):
            return "gguf", p
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
        "directory (config.json), a run directory or a GGUF file"
    )


def load(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """A ready model in eval mode from an lmforge checkpoint, run, Hugging Face directory or
    GGUF file."""
    kind, directory = resolve(path)
    if kind == "gguf":
        from lmforge.interop.gguf import load_gguf

        return load_gguf(directory, device=device, dtype=dtype)
    if kind == "hf":
        from lmforge.interop.hf import load_hf

        return load_hf(directory, device=device, dtype=dtype)
    if (directory / "quantization.yaml").is_file():
        from lmforge.compress.quantized_model import load_quantized

        return load_quantized(directory, device=device)
    from lmforge.train.checkpoint import load_model

    return load_model(directory, device=device, dtype=dtype)


def load_tokenizer(path: str | Path):
    """The tokenizer of a model (tokenizer.json beside it, or a GGUF file's own), for any
    source `load` accepts."""
    from lmforge.tokenizer import Tokenizer

    kind, directory = resolve(path)
    if kind == "gguf":
        from lmforge.interop.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(directory)
    return Tokenizer.load(directory)
