"""Fitting scaling laws to training runs: Chinchilla approaches 3 (parametric) and 2 (IsoFLOP)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from lmforge.scaling.laws import ChinchillaLaw

# Chinchilla (Hoffmann et al. 2022), App. D.2, starts L-BFGS from every point of this grid (4500
# points); we evaluate the objective on all of them but start L-BFGS only from the best few.
_GRID = list(
    itertools.product(
        np.arange(0, 30, 5),  # a = log A
        np.arange(0, 30, 5),  # b = log B
        np.arange(-1, 1.5, 0.5),  # e = log E
        np.arange(0, 2.5, 0.5),  # alpha
        np.arange(0, 2.5, 0.5),  # beta
    )
)
_N_STARTS = 8
_MAX_ITER = 100


@dataclass
class ChinchillaFit:
    """A fitted ChinchillaLaw with 5-95% bootstrap intervals and the runs it was fitted on."""

    law: ChinchillaLaw
    intervals: dict[str, tuple[float, float]]
    n_runs: int
    residuals: np.ndarray  # log L_hat - log L per run used
    excluded: list[int] = field(default_factory=list)  # indices of runs with non-finite loss
    bootstrap_laws: list[ChinchillaLaw] = field(default_factory=list)

    def predict(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        """Predicted loss of the fitted law."""
        return self.law.loss(n, d)

    def compute_optimal(self, flops: float) -> dict[str, float | tuple[float, float]]:
        """N_opt and D_opt of the fitted law with their 5-95% intervals over the bootstrap laws."""
        n, d = self.law.compute_optimal(flops)
        boot = np.array([law.compute_optimal(flops) for law in self.bootstrap_laws])
        out: dict[str, float | tuple[float, float]] = {"N_opt": n, "D_opt": d}
        if len(boot):
            out["N_opt_interval"] = _interval(boot[:, 0])
            out["D_opt_interval"] = _interval(boot[:, 1])
        return out


def _interval(x: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(x, [5, 95])
    return float(lo), float(hi)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))


def _grid_objective(grid: np.ndarray, log_n, log_d, log_l, delta: float) -> np.ndarray:
    """Huber sum at every grid point (rows of theta) at once, to rank the starting points."""
    a, b, e, alpha, beta = (grid[:, i, None] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e))
    return _huber(np.logaddexp.reduce(terms, axis=0) - log_l, delta).sum(axis=1)


def _objective(theta: np.ndarray, log_n, log_d, log_l, delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber(log L_hat - log L) and its gradient in theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)  # softmax weights = d log L_hat / d term
    total = w.sum(axis=0)
    w /= total
    r = top + np.log(total) - log_l  # log L_hat - log L, with log L_hat = LSE(terms)
    dr = np.clip(r, -delta, delta)  # Huber'(r)
    value = _huber(r, delta).sum()
    grad = np.array(
        [
            dr @ w[0],
            dr @ w[1],
            dr @ w[2],
            -(dr * w[0]) @ log_n,
            -(dr * w[1]) @ log_d,
        ]
    )
    # Divided by delta so the objective is O(|r|): scipy's default tolerances then mean something
    # (the raw sum is ~delta * |r| and L-BFGS would stop at once); the minimiser is unchanged.
    return float(value) / delta, grad / delta


def _lbfgs(theta0: np.ndarray, args: tuple) -> np.ndarray:
    # Near the optimum most residuals sit on Huber's linear arms, where L-BFGS creeps; a cap on
    # iterations keeps the fit and each bootstrap refit fast at a negligible cost in accuracy.
    opts = {"maxiter": _MAX_ITER, "maxfun": 2 * _MAX_ITER}
    return minimize(_objective, theta0, args=args, jac=True, method="L-BFGS-B", options=opts).x


def _to_law(theta: np.ndarray) -> ChinchillaLaw:
    a, b, e, alpha, beta = theta
    return ChinchillaLaw(
        E=float(np.exp(e)),
        A=float(np.exp(a)),
        B=float(np.exp(b)),
        alpha=float(alpha),
        beta=float(beta),
    )


def law_values(law: ChinchillaLaw) -> dict[str, float]:
    """The five constants and the compute-optimal exponents a, b of a law, by name."""
    s = law.alpha + law.beta
    # a and b are the compute-optimal exponents N_opt ~ C^a, D_opt ~ C^b (Hoffmann et al. eq. 4).
    return {
        "E": law.E,
        "A": law.A,
        "B": law.B,
        "alpha": law.alpha,
        "beta": law.beta,
        "a": law.beta / s,
        "b": law.alpha / s,
    }


def fit_chinchilla(
    n: np.ndarray,
    d: np.ndarray,
    loss: np.ndarray,
    *,
    delta: float = 1e-3,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> ChinchillaFit:
    """Fit L = E + A/N^alpha + B/D^beta to runs (parameters, tokens, loss): Chinchilla approach 3.

    Runs whose loss is NaN or inf are left out and listed in `excluded`.
    """
    n, d, loss = (np.asarray(x, dtype=float).ravel() for x in (n, d, loss))
    if not (len(n) == len(d) == len(loss)):
        raise ValueError(f"N, D and L must have equal lengths, got {len(n)}, {len(d)}, {len(loss)}")
    if not np.all(np.isfinite(n) & np.isfinite(d) & (n > 0) & (d > 0)):
        raise ValueError("every N (parameters) and D (tokens) must be positive and finite")
    finite = np.isfinite(loss)
    excluded = [int(i) for i in np.flatnonzero(~finite)]
    n, d, loss = n[finite], d[finite], loss[finite]
    if np.any(loss <= 0):
        raise ValueError("losses must be positive (nats per token)")
    if len(loss) < 5:
        raise ValueError(
            f"need at least 5 runs with finite loss to fit the 5 constants (E, A, B, alpha, beta), "
            f"got {len(loss)}" + (f" ({len(excluded)} excluded as NaN/inf)" if excluded else "")
        )
    args = (np.log(n), np.log(d), np.log(loss), delta)

    # Huber on log-loss is robust to outlier runs (Hoffmann et al. App. D.2); the objective has
    # local minima, hence the grid of starts and keeping the best end point.
    grid = np.array(_GRID)
    starts = grid[np.argsort(_grid_objective(grid, *args))[:_N_STARTS]]
    ends = [_lbfgs(t, args) for t in starts]
    best = min(ends, key=lambda t: _objective(t, *args)[0])

    # Bootstrap over runs; each refit starts from the best point only, which keeps it cheap.
    rng = np.random.default_rng(seed)
    boot_laws = []
    for _ in range(n_bootstrap):
        i = rng.integers(0, len(loss), len(loss))
        boot_args = (args[0][i], args[1][i], args[2][i], delta)
        boot_laws.append(_to_law(_lbfgs(best, boot_args)))
    values = [law_values(law) for law in boot_laws]
    intervals = (
        {k: _interval(np.array([v[k] for v in values])) for k in values[0]} if values else {}
    )

    law = _to_law(best)
    residuals = np.log(law.loss(n, d)) - np.log(loss)
    return ChinchillaFit(law, intervals, len(loss), residuals, excluded, boot_laws)


def fit_isoflop(n: np.ndarray, loss: np.ndarray) -> tuple[float, np.ndarray]:
    """Optimal N at one compute budget from a parabola in log N (Chinchilla approach 2).

    Returns (N_opt, coefficients of loss = c2 x^2 + c1 x + c0 with x = ln N, highest first).
    """
    n, loss = np.asarray(n, dtype=float).ravel(), np.asarray(loss, dtype=float).ravel()
    if len(n) != len(loss):
        raise ValueError(f"N and L must have equal lengths, got {len(n)} and {len(loss)}")
    if np.any(n <= 0):
        raise ValueError("every N (parameters) must be positive")
    keep = np.isfinite(loss)
    if keep.sum() < 3:
        raise ValueError(f"an IsoFLOP parabola needs at least 3 finite runs, got {keep.sum()}")
    coeffs = np.polyfit(np.log(n[keep]), loss[keep], 2)
    if coeffs[0] <= 0:
        raise ValueError("the IsoFLOP curve has no minimum (parabola opens downward)")
    return float(np.exp(-coeffs[1] / (2 * coeffs[0]))), coeffs
