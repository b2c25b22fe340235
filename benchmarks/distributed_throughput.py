"""Parallel training on CPU: 1 process vs 2 processes (DDP, ZeRO-1, FSDP2, TP, PP) on 2 cores.

Same model, global batch and data in every configuration; each runs under torch's elastic agent
(what torchrun runs). Prints tokens/s over all ranks, the ratio to one process, and per rank the
bytes of parameters + gradients + optimizer state it holds (FSDP2 shards all three, ZeRO-1 the
optimizer state, a pipeline stage has gradients and optimizer state of its blocks only, DDP
replicates everything) and its peak RSS.

    python benchmarks/distributed_throughput.py [--steps 6] [--d-model 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.train import distributed
from lmforge.train.perf import peak_memory_bytes
from lmforge.train.trainer import TrainConfig, Trainer

VOCAB, SEQ, GLOBAL_BATCH = 8192, 128, 8


class RandomTokens:
    def get_batch(self, batch_size, seq_len, *, seed, step, micro_step=0):
        g = torch.Generator().manual_seed(step * 1000 + micro_step)
        t = torch.randint(0, VOCAB, (batch_size, seq_len + 1), generator=g)
        return t[:, :-1], t[:, 1:]


def local_bytes(tensors) -> int:
    """Bytes this rank stores for `tensors` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(
    parallel: str, threads: int, steps: int, d_model: int, layers: int, zero1: bool = False
) -> dict:
    torch.set_num_threads(threads)
    env = distributed.init("cpu", timeout_s=600)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=VOCAB, d_model=d_model, n_layers=layers, n_heads=d_model // 64,
            max_seq_len=SEQ, tie_embeddings=False,
        )
    )  # fmt: skip
    config = TrainConfig(
        steps=steps + 2,
        batch_size=GLOBAL_BATCH if parallel == "tp" else GLOBAL_BATCH // env.world_size,
        global_batch_size=GLOBAL_BATCH, seq_len=SEQ, warmup_steps=1, device="cpu",
        parallel=parallel, zero1=zero1,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, config, RandomTokens(), out)
        for _ in range(2):  # warm-up
            trainer.train_step()
        distributed.barrier(env)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        distributed.barrier(env)
        seconds = time.perf_counter() - start
        # ZeRO-1 keeps this rank's share in an inner optimizer; a pipeline stage trains its part.
        optimizer = getattr(trainer.optimizer, "optim", trainer.optimizer)
        trained = trainer.pipeline.stage if trainer.pipeline is not None else model
        states = [v for s in optimizer.state.values() for v in s.values()]
        held = local_bytes(list(model.parameters()) + states)
        held += local_bytes(trained.parameters())  # gradients: the size of the trained weights
        result = {
            "tokens_per_s": steps * GLOBAL_BATCH * SEQ / seconds,
            "state_mb": held / 2**20,
            "peak_rss_mb": peak_memory_bytes(torch.device("cpu")) / 2**20,
        }
    gathered = [None] * env.world_size
    if env.active:
        torch.distributed.all_gather_object(gathered, result)
    else:
        gathered = [result]
    distributed.shutdown()
    return gathered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cores = os.cpu_count()
    runs = [
        ("1 process x 1 thread", 1, "ddp", 1, False),
        (f"1 process x {cores} threads", 1, "ddp", cores, False),
        ("2 processes DDP x 1 thread", 2, "ddp", 1, False),
        ("2 processes DDP + ZeRO-1 x 1 thread", 2, "ddp", 1, True),
        ("2 processes FSDP2 x 1 thread", 2, "fsdp", 1, False),
        ("2 processes tensor parallel x 1 thread", 2, "tp", 1, False),
        ("2 processes pipeline (2 stages, 1F1B) x 1 thread", 2, "pp", 1, False),
    ]
    print(f"load before: {os.getloadavg()}")
    base = None
    print(
        "| configuration | tokens/s | vs 1x1 | weights+grads+optimizer per rank | peak RSS per rank |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, nproc, parallel, threads, zero1 in runs:
        ranks = distributed.launch(
            nproc, worker, parallel, threads, args.steps, args.d_model, args.layers, zero1
        )
        rate = ranks[0]["tokens_per_s"]
        base = base or rate
        state = " / ".join(f"{r['state_mb']:.1f} MiB" for r in ranks)
        rss = " / ".join(f"{r['peak_rss_mb']:.0f} MiB" for r in ranks)
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {state} | {rss} |", flush=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
