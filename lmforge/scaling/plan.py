"""Plan a pretraining run from a compute budget: compute-optimal size, tokens, model shape, recipe."""

from __future__ import annotations

import math

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.scaling.laws import CHINCHILLA, ChinchillaLaw

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets: H100 SXM, A100 SXM,
# H200 SXM (same compute die as H100) and L4.
GPU_PEAK_FLOPS = {"h100": 989e12, "a100": 312e12, "h200": 989e12, "l4": 121e12}
SEQ_LEN = 2048


def _shape_params(d_model: int, n_layers: int, vocab_size: int) -> float:
    # Only to rank candidate shapes: 12*L*d^2 for attention (4d^2) + SwiGLU (3 * d * 8d/3),
    # plus untied input and output tables. The reported count is the exact one of the built model.
    return 12 * n_layers * d_model**2 + 2 * vocab_size * d_model


def recommend_model(n_params: float, vocab_size: int = 32768) -> ModelConfig:
    """A Llama-style ModelConfig whose size is near n_params, with d_model/n_layers in [64, 128]."""
    # Aspect ratios of 64-128 (d_model / n_layers) cover GPT-3 and Llama, and Kaplan et al. 2020
    # (fig. 5) find the loss nearly flat in shape over that range at fixed N.
    # Heads of 64 dims up to d_model 2048, then 128 as in Llama, so d_model steps by the head size.
    best = None
    for d_model in [*range(128, 2048, 64), *range(2048, 32768 + 1, 128)]:
        for n_layers in range(max(1, d_model // 128), d_model // 64 + 1):
            err = abs(math.log(_shape_params(d_model, n_layers, vocab_size) / n_params))
            if best is None or err < best[0]:
                best = (err, d_model, n_layers)
    _, d_model, n_layers = best
    head_dim = 128 if d_model >= 2048 else 64
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=d_model // head_dim,
        max_seq_len=SEQ_LEN,
        tie_embeddings=False,
    )


def _num_params(config: ModelConfig) -> int:
    with torch.device("meta"):  # counts without allocating the weights
        return Transformer(config).num_params()


def plan(
    flops: float | None = None,
    *,
    gpu_hours: float | None = None,
    gpu: str = "h100",
    mfu: float = 0.4,
    law: ChinchillaLaw = CHINCHILLA,
) -> dict:
    """Compute-optimal N and D, predicted loss, a model shape and a training recipe for a budget
    given as FLOPs or as GPU-hours at a model-FLOPs utilisation `mfu`."""
    if (flops is None) == (gpu_hours is None):
        raise ValueError("give exactly one of flops or gpu_hours")
    if gpu_hours is not None:
        if gpu not in GPU_PEAK_FLOPS:
            raise ValueError(f"unknown gpu {gpu!r}; known: {', '.join(GPU_PEAK_FLOPS)}")
        flops = gpu_hours * 3600 * GPU_PEAK_FLOPS[gpu] * mfu
    if not flops > 0:
        raise ValueError(f"the compute budget must be positive, got {flops}")
    n_opt, d_opt = law.compute_optimal(flops)
    model = recommend_model(n_opt)
    # DeepSeek LLM (Bi et al. 2024, eq. 1) fits optimal batch size and lr as power laws in compute:
    # B = 0.292 C^0.3271 tokens, lr = 0.3118 C^-0.125; a starting guess, not a guarantee.
    batch_size = max(1, round(0.292 * flops**0.3271 / SEQ_LEN))
    steps = max(1, math.ceil(d_opt / (batch_size * SEQ_LEN)))
    recipe = {
        "tokens": int(d_opt),
        "seq_len": SEQ_LEN,
        "batch_size": batch_size,
        "batch_tokens": batch_size * SEQ_LEN,
        "steps": steps,
        "lr": 0.3118 * flops**-0.125,
        "warmup_steps": max(1, round(0.01 * steps)),
    }
    return {
        "flops": flops,
        "gpu_hours": gpu_hours,
        "gpu": gpu if gpu_hours is not None else None,
        "mfu": mfu if gpu_hours is not None else None,
        "n_opt": n_opt,
        "d_opt": d_opt,
        "tokens_per_parameter": d_opt / n_opt,
        "loss": law.loss_at_compute(flops),
        "model": model,
        "model_params": _num_params(model),
        "train": recipe,
    }


def format_plan(p: dict) -> str:
    """The plan as a few aligned lines for the CLI."""
    m, t = p["model"], p["train"]
    budget = f"{p['flops']:.3g} FLOPs"
    if p["gpu_hours"] is not None:
        budget += f" ({p['gpu_hours']:g} {p['gpu']} GPU-hours at {p['mfu']:.0%} MFU)"
    lines = [
        ("budget", budget),
        ("compute-optimal N", f"{p['n_opt']:.3g} parameters"),
        ("compute-optimal D", f"{p['d_opt']:.3g} tokens"),
        ("tokens per parameter", f"{p['tokens_per_parameter']:.1f}"),
        ("predicted loss", f"{p['loss']:.3f} nats/token"),
        (
            "model",
            f"d_model={m.d_model} n_layers={m.n_layers} n_heads={m.n_heads} "
            f"vocab_size={m.vocab_size} ({p['model_params']:.3g} parameters)",
        ),
        (
            "train",
            f"steps={t['steps']} batch_size={t['batch_size']} seq_len={t['seq_len']} "
            f"({t['batch_tokens']} tokens/step) lr={t['lr']:.2g} warmup_steps={t['warmup_steps']}",
        ),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
