"""Scaling laws: Kaplan et al. 2020 (KM) and Chinchilla (Hoffmann et al. 2022), plus training FLOPs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from lmforge.model import ModelConfig, Transformer

PF_DAY = 1e15 * 24 * 3600  # FLOPs in one petaflop/s-day, KM's unit of compute


@dataclass(frozen=True)
class KaplanLaw:
    """KM power laws (Kaplan et al. 2020, eqs. 1.1-1.3), each with the other factors unbounded.

    N: non-embedding parameters; D: tokens; C: training FLOPs (converted to PF-days inside).
    """

    alpha_n: float = 0.076
    n_c: float = 8.8e13
    alpha_d: float = 0.095
    d_c: float = 5.4e13
    # Seed 002 §2.1 writes L(C) = (C_c/N)^α_C with C_c ~ 3.1e13; the paper (eq. 1.3) has
    # L(C_min) = (C_c/C_min)^α_C with C_c ~ 3.1e8 PF-days and α_C ~ 0.050.
    alpha_c: float = 0.050
    c_c: float = 3.1e8

    def loss_n(self, n: np.ndarray | float) -> np.ndarray | float:
        """Loss (nats/token) of a model with n non-embedding parameters trained to convergence."""
        return (self.n_c / np.asarray(n, dtype=float)) ** self.alpha_n

    def loss_d(self, d: np.ndarray | float) -> np.ndarray | float:
        """Loss of a large model trained with early stopping on d tokens."""
        return (self.d_c / np.asarray(d, dtype=float)) ** self.alpha_d

    def loss_c(self, flops: np.ndarray | float) -> np.ndarray | float:
        """Loss at compute-efficient training with `flops` FLOPs (KM's C_min, in PF-days)."""
        return (self.c_c / (np.asarray(flops, dtype=float) / PF_DAY)) ** self.alpha_c


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, eq. 2); N: parameters, D: tokens."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        """Predicted loss in nats/token; broadcasts like numpy."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L under C = 6ND, in closed form (Hoffmann et al. 2022, eq. 4).

        N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, a = beta/(alpha+beta), b = alpha/(alpha+beta),
        G = (alpha A / (beta B))^(1/(alpha+beta)). Seed 002 §2.1 writes a = alpha/(alpha+beta),
        which is b; setting dL/dN = 0 along D = C/(6N) gives the paper's a = beta/(alpha+beta).
        """
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        return g * (flops / 6) ** (self.beta / s), (flops / 6) ** (self.alpha / s) / g

    def compute_optimal_numeric(self, flops: float) -> tuple[float, float]:
        """The same optimum found by minimising L(N, C/(6N)) over log N: a check on the closed form."""
        log_c6 = math.log(flops / 6)
        res = minimize_scalar(
            lambda x: float(self.loss(math.exp(x), math.exp(log_c6 - x))),
            bounds=(0.0, log_c6),
            method="bounded",
            options={"xatol": 1e-10},
        )
        n = math.exp(res.x)
        return n, flops / (6 * n)

    def tokens_per_parameter(self, flops: float) -> float:
        """D_opt / N_opt at this budget (about 20 for Chinchilla's own approaches 1-2)."""
        n, d = self.compute_optimal(flops)
        return d / n

    def loss_at_compute(self, flops: float) -> float:
        """Predicted loss of the compute-optimal model for this budget."""
        return float(self.loss(*self.compute_optimal(flops)))


KAPLAN = KaplanLaw()
CHINCHILLA = ChinchillaLaw()


def training_flops(config: ModelConfig, tokens: int, seq_len: int) -> float:
    """Training FLOPs for `tokens` tokens at `seq_len`, from the model's own flops_per_token."""
    # The meta device allocates no memory, so the count comes from the one formula in
    # Transformer.flops_per_token (PaLM App. B: 6N + 12*L*H*Dh*T) for any model size.
    with torch.device("meta"):
        model = Transformer(config)
    return float(tokens) * model.flops_per_token(seq_len)
