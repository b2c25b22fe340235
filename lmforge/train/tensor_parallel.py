"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) of attention and MLP via DTensor.

Each block's input projections (attention qkv, MLP w_in) are split by output rows across the
ranks (column parallel) and its output projections (attention out, MLP w_out) by input columns
(row parallel), so a block needs one all-reduce forward and one backward. lmforge fuses q/k/v
into one matrix and SwiGLU's gate/up into another; a plain split of those rows would hand rank 0
all of q and rank 1 k and v. So the rows are first reordered so that every rank's contiguous share
holds its heads of q, then of k, then of v (resp. its share of gate, then of up): each rank then
runs the unchanged block code on its own heads. Checkpoints store the original order.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError


def _rank_major_order(part_sizes: list[int], tp: int) -> torch.Tensor:
    """Row order putting rank r's 1/tp of every fused part next to each other, rank by rank."""
    order, start = [[] for _ in range(tp)], 0
    for size in part_sizes:
        share = size // tp
        for r in range(tp):
            order[r].extend(range(start + r * share, start + (r + 1) * share))
        start += size
    return torch.tensor([i for rows in order for i in rows])


def fused_row_orders(config, tp: int) -> dict[str, torch.Tensor]:
    """For each fused weight (by its name inside a block), the tensor-parallel row order."""
    q, kv = config.n_heads * config.dim_head, config.kv_heads * config.dim_head
    orders = {"attn.qkv": _rank_major_order([q, kv, kv], tp)}
    if config.gated_mlp:  # SwiGLU / GeGLU: w_in is [gate; up]
        orders["mlp.w_in"] = _rank_major_order([config.ff_dim, config.ff_dim], tp)
    return orders


def check_divisible(config, tp: int) -> None:
    for name, n in (
        ("n_heads", config.n_heads),
        ("kv heads", config.kv_heads),
        ("ff_dim", config.ff_dim),
    ):
        if n % tp:
            raise ConfigError(
                f"tensor parallel degree {tp} does not divide the model's {name} ({n}); "
                "use a degree that divides n_heads, the kv heads and the MLP width"
            )


def reorder_state_dict(
    weights: dict[str, torch.Tensor], config, tp: int, *, to_parallel: bool
) -> dict[str, torch.Tensor]:
    """Full weights from the checkpoint order to the tensor-parallel one, or back."""
    out = dict(weights)
    for suffix, order in fused_row_orders(config, tp).items():
        index = order if to_parallel else torch.argsort(order)
        for name, tensor in weights.items():
            if name.endswith(f".{suffix}.weight") or name.endswith(f".{suffix}.bias"):
                out[name] = tensor[index.to(tensor.device)]
    return out


def apply_tensor_parallel(model: nn.Module, mesh) -> None:
    """Shard every block of `model` over the 1-D device `mesh`, in place."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp = mesh.size()
    config = model.config
    check_divisible(config, tp)
    orders = fused_row_orders(config, tp)
    plan = {
        "attn.qkv": ColwiseParallel(),
        "attn.out": RowwiseParallel(),
        "mlp.w_in": ColwiseParallel(),
        "mlp.w_out": RowwiseParallel(),
    }
    for block in model.blocks:
        with torch.no_grad():
            for suffix, order in orders.items():
                linear = block.get_submodule(suffix)
                linear.weight.copy_(linear.weight[order])
                if linear.bias is not None:
                    linear.bias.copy_(linear.bias[order])
        parallelize_module(block, mesh, plan)
        # The block code views its projection as (heads, dim): give it this rank's head counts.
        block.attn.n_heads //= tp
        block.attn.kv_heads //= tp
