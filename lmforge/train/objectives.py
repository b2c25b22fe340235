"""Training objectives: a function (model, batch) -> mean loss. Only causal LM for now."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.layers import _ONEDNN_LINEAR
from lmforge.model.transformer import Transformer

IGNORE_INDEX = -100
# Logit elements per chunk of linear_cross_entropy (128 MiB in fp32; 682 rows of a 49152-token
# vocabulary). Every chunk reads the whole output weight again, so smaller chunks cost speed: on
# the 2-core CPU of docs/benchmarks.md, 512 rows x 49152 in chunks of 64/128/256 rows took
# 1.6/1.5/1.3x the time of one chunk (loss + input gradient; docs/adapt.md, "Measured").
CHUNK_ELEMENTS = 1 << 25


def causal_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy, mean over targets that are not IGNORE_INDEX (seed 002, 4.2.3)."""
    x, y = batch
    return output_loss(model, lambda **kw: model(x, **kw), y)


def output_loss(
    model: nn.Module, run: Callable[..., torch.Tensor], targets: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the model's output against `targets`, mean over those that are not
    IGNORE_INDEX; `run(**kw)` is the model's forward with extra keyword arguments.

    A plain lmforge Transformer skips its output layer (hidden_only) and linear_cross_entropy
    applies it chunk by chunk. A wrapped (DDP/FSDP) or compiling model, or one with forward
    hooks on itself (they may read the logits, like the z-loss), gets the full logits."""
    if _chunked_head_applies(model):
        return linear_cross_entropy(run(hidden_only=True), model.lm_head.weight, targets)
    logits = run()
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _chunked_head_applies(model: nn.Module) -> bool:
    return (
        isinstance(model, Transformer)
        and not model._forward_hooks
        and not torch.compiler.is_compiling()  # inductor fuses the plain loss itself
        and type(model.lm_head.weight) is nn.Parameter  # not a sharded or quantized weight
        and model.lm_head.bias is None
    )


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x w^T; oneDNN where the model's Linear uses it too (fp32 on CPU, lmforge.model.layers).
    if _ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets, ignore_index), mean over kept targets,
    without ever holding the (tokens, vocab) fp32 logits or their gradient: rows go through
    the output layer `chunk_rows` at a time (0: CHUNK_ELEMENTS logits per chunk)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows but {t.shape[0]} targets")
    rows = chunk_rows if chunk_rows > 0 else max(1, CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, t, ignore_index, rows)
    return _chunked(h, weight, t, ignore_index, rows, need_h=False, need_w=False)[0]


def _chunked(h, w, t, ignore_index: int, rows: int, *, need_h: bool, need_w: bool):
    """The mean loss and, if asked, its gradients with respect to h and w. Each chunk's logit
    gradient, (softmax - onehot) / n, is formed in place of its logits and used at once, so the
    backward pass never recomputes the logits."""
    kept = t != ignore_index
    n = int(kept.sum())  # the mean's denominator; 0 gives NaN like F.cross_entropy
    row_scale = kept / max(n, 1)  # ignored rows get no gradient
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros_like(w, dtype=torch.float32) if need_w else None
    for start in range(0, h.shape[0], rows):
        hc, keep = h[start : start + rows], kept[start : start + rows]
        tc = torch.where(keep, t[start : start + rows], 0)
        logits = _linear(hc, w).float()
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, tc[:, None]).squeeze(1)
        total += ((lse - picked) * keep).sum()
        if need_h or need_w:
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            grad[torch.arange(len(tc), device=tc.device), tc] -= 1.0
            grad.mul_(row_scale[start : start + rows, None])
            if need_h:
                grad_h[start : start + rows] = _linear(grad.to(w.dtype), w.t())
            if need_w:
                grad_w.addmm_(grad.t(), hc.float())
    grad_w = grad_w.to(w.dtype) if need_w else None
    return total / n if n else total * float("nan"), grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy with its gradients computed chunk by chunk in the forward pass
    (as in the fused linear + cross-entropy of Liger Kernel, Hsu et al. 2024); backward only
    scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, w, t, ignore_index, rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, ctx.grad_h, ctx.grad_w = _chunked(
            h, w, t, ignore_index, rows, need_h=need_h, need_w=need_w
        )
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h = ctx.grad_h * grad_loss.to(ctx.grad_h.dtype) if ctx.grad_h is not None else None
        grad_w = ctx.grad_w * grad_loss.to(ctx.grad_w.dtype) if ctx.grad_w is not None else None
        ctx.grad_h = ctx.grad_w = None
        return grad_h, grad_w, None, None, None
