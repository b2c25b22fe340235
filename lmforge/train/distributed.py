"""Data parallelism over torch.distributed, applied to a finished model (model code stays free of it).

Processes come from `torchrun` (or `launch`, which runs the same elastic agent in-process): they
read RANK / WORLD_SIZE / LOCAL_RANK from the environment. NCCL joins GPUs, gloo joins CPUs. The
wrappers are PyTorch's own: DDP (replicated weights, all-reduced gradients) and FSDP2's
`fully_shard` (ZeRO-3: parameters, gradients and optimizer state sharded across ranks; Rajbhandari
et al. 2020), hybrid when the mesh has a replicate and a shard dimension (HSDP).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among world_size processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def current() -> DistEnv:
    """The process's place in the initialized process group (rank 0 of 1 without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init(device: str, timeout_s: float) -> DistEnv:
    """Join the process group torchrun set up (a no-op for a single plain process).

    The timeout bounds every collective: a rank that crashed or hangs makes the others fail
    after `timeout_s` with an error instead of waiting forever."""
    if not launched_by_torchrun() or dist.is_initialized():
        return current()
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return current()


def shutdown(clean: bool = True) -> None:
    """Leave the process group; after an error, without waiting for the other ranks."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def process_device(device: str, env: DistEnv) -> str:
    """Each rank drives its own GPU (cuda:LOCAL_RANK, whatever index was asked); CPUs are shared."""
    if env.active and (
        device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    ):
        return f"cuda:{env.local_rank}"
    return device


def micro_batches_per_rank(
    global_batch: int, batch_size: int, grad_accum: int, world_size: int
) -> int:
    """Gradient-accumulation steps per rank: global batch = batch_size x world x accumulation.

    global_batch 0 keeps `grad_accum` (the global batch then grows with the world size)."""
    if global_batch == 0:
        return grad_accum
    per_step = batch_size * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not a multiple of train.batch_size "
            f"({batch_size}) x world size ({world_size}) = {per_step}; change one of them"
        )
    return global_batch // per_step


def parallelize(
    model: nn.Module,
    mode: str,
    env: DistEnv,
    *,
    replicate: int = 1,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Wrap `model` for data parallelism; returns what the training forward should call.

    ddp: DistributedDataParallel; fsdp: FSDP2 fully_shard per block and at the root, in place
    (parameters become DTensors), ZeRO-3 when replicate is 1, hybrid (HSDP: replicate groups of
    world/replicate ranks that each shard) otherwise. param_dtype (fsdp): gather weights in this
    dtype for compute while the sharded master weights and the gradient reduction stay fp32."""
    if not env.active:
        return model
    if mode == "ddp":
        device_ids = [env.local_rank] if next(model.parameters()).is_cuda else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if env.world_size % replicate:
            raise ConfigError(
                f"train.fsdp_replicate={replicate} does not divide the world size {env.world_size}"
            )
        device_type = next(model.parameters()).device.type
        if replicate > 1:
            shape, names = (replicate, env.world_size // replicate), ("replicate", "shard")
        else:
            shape, names = (env.world_size,), ("shard",)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        # One FSDP unit per block: its weights are gathered just before it runs and freed after.
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    raise ConfigError(f"train.parallel: unknown mode {mode!r} (none, ddp, fsdp)")


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """ZeRO-1 (Rajbhandari et al. 2020, stage 1) for DDP: the same optimizer, its parameter
    groups and settings, but each rank keeps the state of (and updates) only its share of the
    parameters, then broadcasts them; the weights and gradients stay replicated."""
    import inspect

    from torch.distributed.optim import ZeroRedundancyOptimizer

    # `defaults` may hold derived settings the constructor does not take (AdamW's
    # decoupled_weight_decay): pass on only its own arguments.
    accepted = inspect.signature(type(optimizer).__init__).parameters
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return ZeroRedundancyOptimizer(
        [dict(group) for group in optimizer.param_groups],
        optimizer_class=type(optimizer),
        **settings,
    )


def gradient_sync(forward_model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on accumulation micro-batches that are not the last one."""
    if isinstance(forward_model, nn.parallel.DistributedDataParallel) and not sync:
        return forward_model.no_sync()
    if hasattr(forward_model, "set_requires_gradient_sync"):  # an FSDP2 module
        forward_model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_mixed_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient norm over plain and DTensor gradients (tensor parallel mixes them, which
    clip_grad_norm_ refuses), scaled down to max_norm when above it (0: measure only)."""
    squares = torch.zeros((), dtype=torch.float32)
    for p in params:
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        squares = squares + grad.float().pow(2).sum().cpu()
    norm = float(squares.sqrt())
    if max_norm and norm > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few scalars over ranks (one collective); unchanged in a single process."""
    if not env.active:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


@contextlib.contextmanager
def name_failing_rank(env: DistEnv, timeout_s: float):
    """Re-raise a failed or timed-out collective with this rank's identity and the likely cause."""
    if not env.active:
        yield
        return
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if isinstance(e, dist.DistError) or "timed out" in str(e).lower() or "gloo" in str(e):
            raise RuntimeError(
                f"rank {env.rank} of {env.world_size}: a collective failed or timed out "
                f"(train.dist_timeout_s={timeout_s:g}); another rank probably crashed or "
                f"stopped: {e}"
            ) from e
        raise


def launch(nproc: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` in `nproc` local processes under torch's elastic agent (what torchrun
    runs) and return rank 0's result; a failing rank fails the launch with its traceback."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex[:8],
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # standalone: a free port on this machine
        max_restarts=0,
        monitor_interval=0.5,
    )
    return elastic_launch(config, fn)(*args)[0]
