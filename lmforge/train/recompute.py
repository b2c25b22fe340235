"""Activation recomputation (Chen et al. 2016; Korthikanti et al. 2022), applied from outside the model.

A recomputed block keeps only its input for the backward pass and runs its forward again there,
trading about one extra forward of compute for the block's activations. `full` does this for
every block; `selective` for every k-th block only, for memory between the two extremes.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.errors import ConfigError


def _recomputed(forward):
    def run(*args, **kwargs):
        # Non-reentrant checkpointing: works with keyword arguments, autocast and FSDP2 hooks.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_recomputation(model: nn.Module, mode: str, every: int = 2) -> list[int]:
    """Make blocks of `model.blocks` recompute their activations in backward; returns their
    indices. The forward is replaced on the instance, so parameter names do not change."""
    if mode == "none":
        return []
    if mode not in ("full", "selective"):
        raise ConfigError(f"train.recompute: unknown mode {mode!r} (none, full, selective)")
    if every < 1:
        raise ConfigError(f"train.recompute_every must be >= 1, got {every}")
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError("train.recompute needs a model with a `blocks` list of layers")
    chosen = [i for i in range(len(blocks)) if mode == "full" or i % every == 0]
    for i in chosen:
        blocks[i].forward = _recomputed(blocks[i].forward)
    return chosen
