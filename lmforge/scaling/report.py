"""Scaling report: the runs of a sweep, the fitted law next to the published ones, and plots."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from lmforge.report import pyplot
from lmforge.scaling.fit import ChinchillaFit, law_values
from lmforge.scaling.laws import CHINCHILLA, KAPLAN, ChinchillaLaw

RUN_COLUMNS = [
    "run",
    "N total",
    "N non-emb.",
    "tokens",
    "FLOPs (PaLM)",
    "val loss",
    "predicted",
    "role",
]
PARAM_LABELS = {
    "n_params": "total parameters",
    "n_params_non_embedding": "non-embedding parameters",
}


def _num(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_scaling_report(
    sweep_dir: str | Path,
    runs: list[dict],
    fit: ChinchillaFit,
    *,
    params: str = "n_params_non_embedding",
) -> Path:
    """Write `scaling_report.md` and its PNG plots into sweep_dir.

    `runs` come from `collect_runs`, `fit` from `fit_chinchilla` on the usable runs that are not
    held out, with N = run[params] and D = run["tokens"]; held-out runs check its predictions.
    """
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    usable = [r for r in runs if r["excluded"] is None]
    law = fit.law
    lines = [
        "# Scaling report",
        "",
        f"Fitted L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3: Huber loss on log L, "
        f"5-95% bootstrap intervals) to {fit.n_runs} runs; N = {PARAM_LABELS.get(params, params)}, "
        "D = training tokens, L = validation loss (nats/token).",
        "",
        "## Runs",
        "",
        _row(RUN_COLUMNS),
        _row(["---"] * len(RUN_COLUMNS)),
    ]
    for r in sorted(runs, key=lambda r: (bool(r.get("holdout")), r[params], r["tokens"])):
        loss = r.get("final_val_loss")
        predicted = float(law.loss(r[params], r["tokens"]))
        role = r["excluded"] and "excluded" or ("held out" if r.get("holdout") else "fitted")
        lines.append(
            _row(
                [
                    r["name"],
                    f"{r['n_params']:,}",
                    f"{r['n_params_non_embedding']:,}",
                    f"{r['tokens']:,}",
                    f"{r['flops']:.3e}",
                    "n/a" if loss is None else f"{loss:.4f}",
                    f"{predicted:.4f}",
                    role,
                ]
            )
        )

    lines += ["", "## Fitted constants", ""]
    lines += [_row(["constant", "fitted", "5-95% interval", "Chinchilla", "KM (Kaplan 2020)"])]
    lines += [_row(["---"] * 5)]
    km = {"alpha": f"α_N = {KAPLAN.alpha_n}", "beta": f"α_D = {KAPLAN.alpha_d}"}
    for name in ("E", "A", "B", "alpha", "beta", "a", "b"):
        value = law_values(law)[name]
        interval = fit.intervals.get(name)
        shown = f"{_num(interval[0])} - {_num(interval[1])}" if interval else "n/a"
        published = _num(law_values(CHINCHILLA)[name])
        lines.append(_row([name, _num(value), shown, published, km.get(name, "")]))
    lines += [
        "",
        "a and b are the compute-optimal exponents (N_opt ∝ C^a, D_opt ∝ C^b). KM's exponents "
        "belong to pure power laws without the irreducible term E, so they compare only loosely.",
    ]

    excluded = [r for r in runs if r["excluded"]]
    if excluded:
        lines += ["", "## Excluded runs", ""]
        lines += [f"- `{r['name']}` ({r['path']}): {r['excluded']}" for r in excluded]

    held_out = [r for r in usable if r.get("holdout")]
    if held_out:
        lines += ["", "## Held-out prediction", ""]
        lines += [_row(["run", "predicted", "measured", "relative error"]), _row(["---"] * 4)]
        for r in held_out:
            predicted = float(law.loss(r[params], r["tokens"]))
            error = (predicted - r["final_val_loss"]) / r["final_val_loss"]
            lines.append(
                _row([r["name"], f"{predicted:.4f}", f"{r['final_val_loss']:.4f}", f"{error:+.2%}"])
            )

    plots = {
        "loss_vs_compute.png": _plot_loss_vs_compute,
        "predicted_vs_actual.png": _plot_predicted_vs_actual,
        "isoflop.png": _plot_isoflop,
    }
    lines += ["", "## Plots", ""]
    for file, plot in plots.items():
        plot(usable, law, params, sweep_dir / file)
        lines.append(f"![{file[:-4]}]({file})")
    path = sweep_dir / "scaling_report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)


def _compute(runs: list[dict], params: str) -> np.ndarray:
    # The law's own compute C = 6ND, so that the runs, the curves and compute_optimal share an axis.
    return np.array([6.0 * r[params] * r["tokens"] for r in runs])


def _plot_loss_vs_compute(runs: list[dict], law: ChinchillaLaw, params: str, path: Path) -> None:
    """Loss vs compute per model size, the fitted law's curve for each, and the optimal frontier."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    c = _compute(runs, params)
    grid = np.geomspace(c.min() / 3, c.max() * 3, 200)
    by_size = defaultdict(list)
    for r, ci in zip(runs, c):
        by_size[r[params]].append((ci, r["final_val_loss"], r.get("holdout", False)))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(by_size)))
    for color, (n, points) in zip(colors, sorted(by_size.items())):
        ax.plot(grid, law.loss(n, grid / (6 * n)), color=color, alpha=0.6)
        for ci, loss, held in points:
            ax.scatter(ci, loss, color=color, marker="*" if held else "o", s=90 if held else 30)
        ax.plot([], [], "o-", color=color, label=f"N = {n:,}")
    ax.plot(grid, [law.loss_at_compute(g) for g in grid], "k--", label="compute-optimal frontier")
    ax.scatter([], [], marker="*", color="gray", s=90, label="held out")
    ax.set_xscale("log")
    ax.set_xlabel("compute C = 6ND (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_predicted_vs_actual(
    runs: list[dict], law: ChinchillaLaw, params: str, path: Path
) -> None:
    """Each run's measured loss against the fitted law's prediction; the diagonal is perfect."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    actual = np.array([r["final_val_loss"] for r in runs])
    predicted = np.array([float(law.loss(r[params], r["tokens"])) for r in runs])
    held = np.array([bool(r.get("holdout")) for r in runs])
    ax.scatter(predicted[~held], actual[~held], label="fitted runs")
    if held.any():
        ax.scatter(
            predicted[held], actual[held], marker="*", s=120, color="tab:red", label="held out"
        )
    lo, hi = min(actual.min(), predicted.min()), max(actual.max(), predicted.max())
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1)
    ax.set_xlabel("predicted loss")
    ax.set_ylabel("measured loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_isoflop(runs: list[dict], law: ChinchillaLaw, params: str, path: Path) -> None:
    """IsoFLOP curves of the fitted law (Chinchilla approach 2's view): loss vs N at fixed C."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    c = _compute(runs, params)
    n_runs = np.array([r[params] for r in runs], dtype=float)
    n_grid = np.geomspace(n_runs.min() / 10, n_runs.max() * 10, 200)
    budgets = np.geomspace(c.min(), c.max(), 4)
    # Far from the optimum the curves shoot up; keep the view on the sweep's range of losses.
    top = float(np.max(law.loss(n_runs, c.min() / (6 * n_runs))))
    colors = plt.cm.plasma(np.linspace(0, 0.8, len(budgets)))
    for color, budget in zip(colors, budgets):
        ax.plot(
            n_grid, law.loss(n_grid, budget / (6 * n_grid)), color=color, label=f"C = {budget:.2g}"
        )
        n_opt, _ = law.compute_optimal(budget)
        ax.scatter(n_opt, law.loss_at_compute(budget), color=color, marker="v")
    ax.set_ylim(top=top + 0.1 * (top - law.E))
    ax.set_xscale("log")
    ax.set_xlabel(f"N ({PARAM_LABELS.get(params, params)})")
    ax.set_ylabel("predicted loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="▼ = compute-optimal N")
    _save(fig, path)
