"""8-bit AdamW: both moments stored as uint8 codes with block-wise scales.

Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization": each state tensor is cut
into blocks of 2048 values, normalized by the block's absolute maximum (so one outlier only costs
its own block precision) and mapped to the nearest of 256 values of the *dynamic tree* data type,
whose exponent-like leading-zero run gives fine resolution near zero, where most Adam state lives.
The update itself runs in fp32 on dequantized states; tensors under 4096 values keep fp32 states
(as the paper does: their memory is negligible and biases/norm gains are sensitive).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

BLOCK = 2048
MIN_8BIT_SIZE = 4096


def dynamic_tree_codes(signed: bool) -> torch.Tensor:
    """The 256 sorted values of the dynamic tree type (Dettmers 2016; 2022, Sec. 2.2).

    After the sign bit (signed only), a run of e zero bits sets the magnitude 10^-e, a one bit ends
    the run, and the remaining bits are a linear fraction in (0.1, 1]: values of e zeros get
    2^(bits - e - 1) evenly spaced fractions. Together with 0 this is 2^bits codes per sign."""
    bits = 7 if signed else 8
    magnitudes = [0.0]
    for e in range(bits):
        n = 2 ** (bits - e - 1)
        # Midpoints of n equal bins of (0.1, 1], so the largest code is just under 1; 1.0 itself
        # (the block maximum) is added below so the absmax element is stored exactly.
        fractions = 0.1 + 0.9 * (torch.arange(n, dtype=torch.float64) + 0.5) / n
        magnitudes += (fractions * 10.0**-e).tolist()
    codes = torch.tensor(sorted(set(magnitudes)), dtype=torch.float64)
    codes[-1] = 1.0
    if signed:
        codes = torch.cat([-codes.flip(0)[:-1], codes])  # -1 .. 0 .. 1: 255 distinct values
    return codes.float()


class BlockQuantized:
    """A tensor stored as uint8 indices into `codes` times a per-block fp32 absmax."""

    def __init__(self, codes: torch.Tensor) -> None:
        self.codes = codes
        self.bounds = (codes[1:] + codes[:-1]) / 2  # nearest code = searchsorted on midpoints

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1)
        pad = (-flat.numel()) % BLOCK
        blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)
        absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        bounds = self.bounds.to(x.device)
        index = torch.searchsorted(bounds, (blocks / absmax).contiguous())
        return index.to(torch.uint8), absmax.squeeze(1)

    def dequantize(
        self, index: torch.Tensor, absmax: torch.Tensor, shape: torch.Size
    ) -> torch.Tensor:
        values = self.codes.to(index.device)[index.long()] * absmax[:, None]
        return values.view(-1)[: shape.numel()].view(shape)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019) with block-wise 8-bit moments: exp_avg in the signed and
    exp_avg_sq in the unsigned dynamic tree type, about 2 bytes of state per weight instead of 8."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.signed = BlockQuantized(dynamic_tree_codes(signed=True))
        self.unsigned = BlockQuantized(dynamic_tree_codes(signed=False))

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32)
        zeros = torch.zeros_like(p, dtype=torch.float32)
        if p.numel() < MIN_8BIT_SIZE:
            state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
            return
        for name, quant in (("exp_avg", self.signed), ("exp_avg_sq", self.unsigned)):
            state[f"{name}_q"], state[f"{name}_absmax"] = quant.quantize(zeros)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                quantized = "exp_avg_q" in state
                if quantized:
                    m = self.signed.dequantize(state["exp_avg_q"], state["exp_avg_absmax"], p.shape)
                    v = self.unsigned.dequantize(
                        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], p.shape
                    )
                else:
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"].item()
                g = p.grad.float()
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-group["lr"] / (1 - beta1**t))
                if quantized:
                    state["exp_avg_q"], state["exp_avg_absmax"] = self.signed.quantize(m)
                    state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = self.unsigned.quantize(v)
        return loss
