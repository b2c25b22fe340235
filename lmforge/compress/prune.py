"""Pruning (seed 001, 模型压缩技术): unstructured magnitude pruning to an exact sparsity, and
structured pruning of attention heads and MLP channels that shrinks the model's config.

Magnitude pruning (Han et al. 2015) zeroes the weights of smallest |w|, either ranked over all
prunable matrices at once (global) or within each matrix (per layer); the zeros do not make
dense matmuls faster, so it is a study of redundancy and a step towards sparse kernels.
Structured pruning removes whole query heads (Michel et al. 2019, "Are Sixteen Heads Really
Better than One?") and SwiGLU/GeLU hidden channels, ranked by importance, and returns a smaller
but ordinary Transformer: fewer heads, a narrower MLP, the same forward code, and faster.
Importance is the first-order Taylor estimate |sum over tokens of h * dL/dh| of removing a unit's
output h (Michel et al. 2019; Molchanov et al. 2017) when calibration batches are given, else the
L2 norm of the weights that exist only for that unit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.config import field_
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.train.checkpoint import model_from_weights, model_state_dict
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import TrainConfig

Masks = dict[str, torch.Tensor]


def _check_sparsity(sparsity: float, what: str = "sparsity") -> None:
    if not 0 <= sparsity < 1:
        raise ConfigError(f"{what} must be in [0, 1), got {sparsity}")


def prunable_weights(model: Transformer) -> dict[str, nn.Parameter]:
    """The matrices of the Transformer blocks (attention and MLP projections); embeddings, the
    output layer and norms are left dense, as is usual (Han et al. 2015; Frantar & Alistarh 2023)."""
    return {
        name: p
        for name, p in model.named_parameters()
        if name.startswith("blocks.") and name.endswith(".weight") and p.ndim == 2
    }


# ------------------------------------------------------------------------- unstructured


def magnitude_masks(
    model: Transformer, sparsity: float, scope: Literal["global", "per_layer"] = "global"
) -> Masks:
    """Boolean keep-masks that zero exactly round(sparsity * n) weights of smallest magnitude:
    among all prunable weights together (global) or in each matrix separately (per_layer). Ties
    at the threshold are broken by position, so the count is exact."""
    _check_sparsity(sparsity)
    if scope not in ("global", "per_layer"):
        raise ConfigError(f"scope {scope!r}: choose 'global' or 'per_layer'")
    weights = prunable_weights(model)
    groups = [[n] for n in weights] if scope == "per_layer" else [list(weights)]
    masks = {}
    for names in groups:
        flat = torch.cat([weights[n].detach().abs().flatten() for n in names])
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[flat.float().argsort(stable=True)[: round(sparsity * flat.numel())]] = False
        for name, part in zip(names, keep.split([weights[n].numel() for n in names])):
            masks[name] = part.view_as(weights[name])
    return masks


def apply_masks(model: Transformer, masks: Masks) -> None:
    """Zero the pruned weights (in place)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].mul_(keep)


def magnitude_prune(
    model: Transformer, sparsity: float, scope: Literal["global", "per_layer"] = "global"
) -> Masks:
    """Zero the smallest-magnitude weights in place to `sparsity`; returns the keep-masks."""
    masks = magnitude_masks(model, sparsity, scope)
    apply_masks(model, masks)
    return masks


def sparsity(model: Transformer) -> float:
    """Fraction of exactly-zero entries among the prunable weights."""
    weights = prunable_weights(model).values()
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def recover(
    model: Transformer, train: Callable[[Transformer], Any], masks: Masks | None = None
) -> Any:
    """A short recovery fine-tune: `train(model)` (any training callable, e.g. a Trainer's fit),
    with the gradients of pruned weights masked so they stay zero; masks are reapplied after."""
    params = dict(model.named_parameters())
    hooks = [
        params[n].register_hook(lambda g, keep=keep: g * keep) for n, keep in (masks or {}).items()
    ]
    try:
        result = train(model)
    finally:
        for hook in hooks:
            hook.remove()
    if masks:
        apply_masks(model, masks)
    return result


# ------------------------------------------------------------------------- structured


def _taylor_importance(
    model: Transformer, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, |sum over a sequence's tokens of h * dL/dh| summed over sequences, for each
    head's output (the input of the output projection, one slice per head) and each MLP hidden
    channel (the input of w_out): the loss change to first order when the unit is removed, which
    is dL/dxi for a gate xi = 1 on the unit (Michel et al. 2019, eq. 2)."""
    c = model.config
    scores = {
        "heads": [torch.zeros(c.n_heads) for _ in model.blocks],
        "channels": [torch.zeros(c.ff_dim) for _ in model.blocks],
    }
    seen: list[tuple[str, int, torch.Tensor]] = []

    def remember(kind: str, layer: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            args[0].retain_grad()
            seen.append((kind, layer, args[0]))

        return hook

    hooks = []
    for i, block in enumerate(model.blocks):
        hooks.append(block.attn.out.register_forward_pre_hook(remember("heads", i)))
        hooks.append(block.mlp.w_out.register_forward_pre_hook(remember("channels", i)))
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            seen.clear()
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss_fn(model, batch).backward()
            for kind, layer, h in seen:
                # (B, T, units * size) -> one dL/dxi per sequence and unit, then |.| summed.
                per_sequence = (h * h.grad).detach().float().sum(dim=1)
                if kind == "heads":
                    per_sequence = per_sequence.view(-1, c.n_heads, c.dim_head).sum(-1)
                scores[kind][layer] += per_sequence.abs().sum(0)
            n += 1
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if n == 0:
        raise ConfigError("structured pruning: the calibration batches are empty")
    return scores["heads"], scores["channels"]


def _magnitude_importance(model: Transformer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the L2 norm of the weights that belong to one query head (its q rows and its
    output-projection columns) and to one MLP channel (its w_in rows and w_out column)."""
    c = model.config
    heads, channels = [], []
    for block in model.blocks:
        q = block.attn.qkv.weight[: c.n_heads * c.dim_head].detach().float()
        out = block.attn.out.weight.detach().float()
        heads.append(
            (
                q.view(c.n_heads, -1).square().sum(1)
                + out.t().reshape(c.n_heads, -1).square().sum(1)
            ).sqrt()
        )
        w_in = block.mlp.w_in.weight.detach().float().view(-1, c.ff_dim, c.d_model)
        w_out = block.mlp.w_out.weight.detach().float()
        channels.append((w_in.square().sum((0, 2)) + w_out.square().sum(0)).sqrt())
    return heads, channels


def unit_importance(
    model: Transformer,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = causal_lm_loss,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per-layer head scores (n_heads,), per-layer channel scores (d_ff,)): Taylor importance
    on calibration `batches` ((input, target) pairs for `loss_fn`), else weight magnitude."""
    if batches is None:
        return _magnitude_importance(model)
    return _taylor_importance(model, batches, loss_fn)


def _kept_heads(scores: torch.Tensor, keep: int, kv_heads: int) -> torch.Tensor:
    """Query heads to keep. GQA shares each k/v head among a group of query heads, so every
    group keeps the same number (the config has one group size); with MHA a head's k/v go with
    it, so the best `keep` heads anywhere are kept."""
    n_heads = scores.numel()
    if kv_heads == n_heads:
        return scores.topk(keep).indices.sort().values
    group = n_heads // kv_heads
    per_group = keep // kv_heads
    best = scores.view(kv_heads, group).topk(per_group, dim=1).indices.sort(dim=1).values
    return (best + torch.arange(kv_heads)[:, None] * group).flatten()


def structured_prune(
    model: Transformer,
    *,
    head_sparsity: float = 0.0,
    mlp_sparsity: float = 0.0,
    importance: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> tuple[Transformer, dict[str, list[torch.Tensor]]]:
    """A new, smaller Transformer without the least important query heads and MLP channels of
    every layer, and the kept indices ({"heads": [...], "channels": [...]}, per layer).

    The same number is removed in every layer (ModelConfig has one n_heads and one d_ff):
    round(sparsity * n) units. With GQA, heads go in equal numbers from each k/v group."""
    _check_sparsity(head_sparsity, "head_sparsity")
    _check_sparsity(mlp_sparsity, "mlp_sparsity")
    c = model.config
    keep_heads = c.n_heads - round(head_sparsity * c.n_heads)
    keep_channels = c.ff_dim - round(mlp_sparsity * c.ff_dim)
    mha = c.kv_heads == c.n_heads
    if not mha and keep_heads % c.kv_heads:
        raise ConfigError(
            f"head_sparsity={head_sparsity} keeps {keep_heads} of {c.n_heads} heads, which does "
            f"not split evenly over the {c.kv_heads} k/v groups; keep a multiple of {c.kv_heads}"
        )
    if keep_heads < 1 or keep_channels < 1:
        raise ConfigError("structured pruning would remove every head or every MLP channel")
    head_scores, channel_scores = importance or unit_importance(model)
    kept = {
        "heads": [_kept_heads(s, keep_heads, c.kv_heads) for s in head_scores],
        "channels": [s.topk(keep_channels).indices.sort().values for s in channel_scores],
    }
    config = replace(
        c,
        n_heads=keep_heads,
        n_kv_heads=keep_heads if mha else c.kv_heads,
        head_dim=c.dim_head,
        d_ff=keep_channels,
    )
    sd = model_state_dict(model)
    for i in range(c.n_layers):
        _slice_attention(sd, f"blocks.{i}.attn", kept["heads"][i], c, mha)
        _slice_mlp(sd, f"blocks.{i}.mlp", kept["channels"][i], c)
    weight = model.embed.weight
    pruned = model_from_weights(
        config, sd, source="structured pruning", device=weight.device, dtype=weight.dtype
    )
    return pruned.train(model.training), kept


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of whole heads in a (heads * head_dim)-sized dimension."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _slice_attention(sd: dict, prefix: str, heads: torch.Tensor, c: ModelConfig, mha: bool) -> None:
    q_size, kv_size = c.n_heads * c.dim_head, c.kv_heads * c.dim_head
    rows = [_rows(heads, c.dim_head)]
    kv = _rows(heads, c.dim_head) if mha else torch.arange(kv_size)
    rows += [q_size + kv, q_size + kv_size + kv]
    index = torch.cat(rows)
    for param in ("weight", "bias"):
        if f"{prefix}.qkv.{param}" in sd:
            sd[f"{prefix}.qkv.{param}"] = sd[f"{prefix}.qkv.{param}"][index]
    sd[f"{prefix}.out.weight"] = sd[f"{prefix}.out.weight"][:, _rows(heads, c.dim_head)]


def _slice_mlp(sd: dict, prefix: str, channels: torch.Tensor, c: ModelConfig) -> None:
    # SwiGLU's w_in is [gate; up]: a channel is a row of each half.
    halves = 2 if c.mlp == "swiglu" else 1
    index = torch.cat([channels + h * c.ff_dim for h in range(halves)])
    for param in ("weight", "bias"):
        if f"{prefix}.w_in.{param}" in sd:
            sd[f"{prefix}.w_in.{param}"] = sd[f"{prefix}.w_in.{param}"][index]
    sd[f"{prefix}.w_out.weight"] = sd[f"{prefix}.w_out.weight"][:, channels]


# ------------------------------------------------------------------------- command


@dataclass
class PruneConfig:
    """Prune a model: unstructured magnitude pruning, or structured removal of heads/channels."""

    model: str = field_("", "model to prune: checkpoint, run, Hugging Face directory or GGUF file")
    out: str = field_("runs/prune", "run directory; the pruned model goes to out/model")
    method: Literal["magnitude", "structured"] = field_(
        "magnitude", "zero single weights (magnitude) or remove heads/MLP channels (structured)"
    )
    sparsity: float = field_(0.5, "magnitude: fraction of block weights set to zero", ge=0)
    scope: Literal["global", "per_layer"] = field_(
        "global", "magnitude: rank weights over all matrices or within each"
    )
    head_sparsity: float = field_(0.0, "structured: fraction of query heads removed", ge=0)
    mlp_sparsity: float = field_(0.5, "structured: fraction of MLP channels removed", ge=0)
    data: str = field_(
        "", "token shards: Taylor importance (structured), loss before/after, recovery ('' skips)"
    )
    calibration_batches: int = field_(8, "batches of train data for Taylor importance", ge=1)
    seq_len: int = field_(128, "tokens per calibration / evaluation sequence", ge=2)
    recover: bool = field_(False, "short recovery fine-tune on --data after pruning")
    train: TrainConfig = field_(
        TrainConfig(steps=100, lr=3e-4, warmup_steps=10, eval_every=0, save_every=0),
        "recovery fine-tune settings (with --recover)",
    )


def _val_loss(model: Transformer, shards: Any, seq_len: int, batches: int = 16) -> float:
    model.eval()
    with torch.no_grad():
        losses = [causal_lm_loss(model, b).item() for b in shards.eval_batches(4, seq_len, batches)]
    return sum(losses) / len(losses)


def prune_command(config: PruneConfig) -> dict[str, Any]:
    """Load, prune, optionally fine-tune, save to out/model; returns (and writes out/prune.json)
    sparsity, parameter counts and the validation loss before and after."""
    from lmforge.data.shards import TokenShards
    from lmforge.loading import load, load_tokenizer, resolve
    from lmforge.train.checkpoint import save_model
    from lmforge.train.pretrain import check_fit
    from lmforge.train.trainer import Trainer

    if not config.model:
        raise ConfigError("give --model=PATH")
    if config.recover and not config.data:
        raise ConfigError("--recover needs --data=SHARD_DIR to fine-tune on")
    model = load(config.model)
    kind, directory = resolve(config.model)
    has_tokenizer = kind == "gguf" or (directory / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(config.model) if has_tokenizer else None
    seq_len = min(config.seq_len, model.config.max_seq_len)
    train = TokenShards(config.data, "train") if config.data else None
    val = TokenShards(config.data, "validation") if config.data else None
    stats: dict[str, Any] = {"method": config.method, "params_before": model.num_params()}
    if val is not None:
        stats["val_loss_before"] = _val_loss(model, val, seq_len)
    masks: Masks = {}
    if config.method == "magnitude":
        masks = magnitude_prune(model, config.sparsity, config.scope)
    else:
        importance = None
        if train is not None:
            batches = (
                train.get_batch(4, seq_len, seed=0, step=i)
                for i in range(config.calibration_batches)
            )
            importance = unit_importance(model, batches)
        model, _ = structured_prune(
            model,
            head_sparsity=config.head_sparsity,
            mlp_sparsity=config.mlp_sparsity,
            importance=importance,
        )
    stats.update(
        params_after=model.num_params(), sparsity=sparsity(model), config=asdict(model.config)
    )
    if val is not None:
        stats["val_loss_pruned"] = _val_loss(model, val, seq_len)
    if config.recover:
        check_fit(model.config, config.train, train.vocab_size, config.data)
        trainer = Trainer(
            model.train(), config.train, train, config.out, val_data=val, tokenizer=tokenizer
        )
        recover(model, lambda _: trainer.fit(), masks)
        stats["val_loss_recovered"] = _val_loss(model, val, seq_len)
    save_model(model.eval(), Path(config.out) / "model", tokenizer=tokenizer)
    (Path(config.out) / "prune.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k != "config"}, indent=2))
    return stats
