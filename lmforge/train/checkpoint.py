"""Checkpoint directories: config.yaml + model.safetensors + tokenizer.json [+ train_state/].

Every write goes to a temporary directory beside the target and is renamed into place only when
complete, so a crash mid-write leaves the previous checkpoint untouched and usable.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import from_dict, to_dict
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.model import ModelConfig, Transformer

CONFIG_FILE, WEIGHTS_FILE, TRAIN_STATE_DIR = "config.yaml", "model.safetensors", "train_state"


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def write_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` then move tmp_dir to `target`, replacing an existing target only
    after the new one is complete. On any error the temp dir is removed and target untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        commit_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def commit_directory(tmp: Path, target: Path) -> None:
    """Flush a completely written `tmp` to disk and rename it to `target` (replacing it)."""
    _fsync_tree(tmp)
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)


def model_state_dict(
    model: Transformer, weights: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Weights to save (`weights` if given, else the model's own): tied output weights stored
    once (safetensors refuses shared storage)."""
    source = model.state_dict() if weights is None else weights
    sd = {k: v.detach().contiguous() for k, v in source.items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_model_files(
    directory: Path,
    model: Transformer,
    *,
    tokenizer: Any = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """config.yaml, model.safetensors and tokenizer.json of `model` into `directory`."""
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(model.config), sort_keys=False))
    save_file(
        model_state_dict(model, weights), str(directory / WEIGHTS_FILE), metadata={"format": "pt"}
    )
    if tokenizer is not None:
        tokenizer.save(directory)


def save_model(
    model: Transformer,
    path: str | Path,
    *,
    tokenizer: Any = None,
    train_state: Callable[[Path], None] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory atomically; `train_state(dir)` may add resume state, and
    `weights` replaces the model's state dict (e.g. one gathered from sharded ranks)."""

    def write(tmp: Path) -> None:
        write_model_files(tmp, model, tokenizer=tokenizer, weights=weights)
        if train_state is not None:
            (tmp / TRAIN_STATE_DIR).mkdir()
            train_state(tmp / TRAIN_STATE_DIR)

    return write_atomically(path, write)


def read_model_config(path: str | Path) -> ModelConfig:
    path = Path(path) / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return from_dict(ModelConfig, data)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path.parent} is not an lmforge checkpoint: no {CONFIG_FILE}"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError, LmforgeError) as e:
        raise CheckpointError(f"{path} is not a valid lmforge model config: {e}") from None


def load_weights(model: Transformer, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy `weights` into `model`, failing with the missing/unexpected/mis-shaped names."""
    expected = model_state_dict(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, "
                f"the config needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(weights, strict=False, assign=True)


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """Load the model of a checkpoint directory (in eval mode)."""
    path = Path(path)
    config = read_model_config(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: no {WEIGHTS_FILE}")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is truncated or corrupt: {e}") from None
    model = model_from_weights(
        config, weights, source=str(weights_path), device=device, dtype=dtype or torch.float32
    )
    return model.eval()


def model_from_weights(
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    *,
    source: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Transformer:
    """Build a Transformer on the meta device and adopt `weights` (converted to `dtype`) as its
    parameters: no random init, and no copy when the stored dtype is already `dtype`."""
    weights = {k: v.to(dtype) for k, v in weights.items()}
    with torch.device("meta"):
        model = Transformer(config)
    load_weights(model, weights, source)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if model.rope is not None:  # non-persistent buffers are not in the file: recompute them
        model.rope.to_empty(device=device)
        model.rope.reset_tables()
    return model.to(device)
