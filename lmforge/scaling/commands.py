"""CLI entry points of the scaling tools: `lmforge plan`, `lmforge scaling sweep|fit`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.config import field_
from lmforge.errors import ConfigError


@dataclass
class PlanConfig:
    """The compute-optimal model and data size for a budget (Chinchilla law)."""

    flops: float | None = field_(None, "training budget in FLOPs", gt=0)
    gpu_hours: float | None = field_(
        None, "training budget in GPU-hours (instead of --flops)", gt=0
    )
    gpu: Literal["h100", "h200", "a100", "l4"] = field_("h100", "GPU for --gpu_hours")
    mfu: float = field_(0.4, "model-FLOPs utilisation assumed for --gpu_hours", gt=0, le=1)


def plan_command(config: PlanConfig) -> dict:
    from lmforge.scaling.plan import format_plan, plan

    if (config.flops is None) == (config.gpu_hours is None):
        raise ConfigError("give exactly one of --flops=C or --gpu_hours=H")
    result = plan(config.flops, gpu_hours=config.gpu_hours, gpu=config.gpu, mfu=config.mfu)
    print(format_plan(result))
    return result


def sweep_command(config) -> Path:
    """Train the sweep's grid (resumable), fit the law to it and write the report."""
    from lmforge.scaling.sweep import run_sweep

    run_sweep(config)
    return fit_command(FitConfig(runs=[config.out], out=config.out))


@dataclass
class FitConfig:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to finished runs and write a report."""

    runs: list[str] = field_([], "sweep or run directories holding summary.json files")
    out: str = field_("", "where to write scaling_report.md (default: the first of --runs)")
    params: Literal["n_params_non_embedding", "n_params"] = field_(
        "n_params_non_embedding", "which parameter count is N"
    )
    n_bootstrap: int = field_(200, "bootstrap resamples for the intervals", ge=0)


def fit_command(config: FitConfig) -> Path:
    from lmforge.scaling.report import write_scaling_report
    from lmforge.scaling.sweep import collect_runs, fit_runs

    if not config.runs:
        raise ConfigError("runs: give at least one sweep or run directory (--runs=[DIR])")
    runs = collect_runs(config.runs)
    fit = fit_runs(runs, params=config.params, n_bootstrap=config.n_bootstrap)
    report = write_scaling_report(config.out or config.runs[0], runs, fit, params=config.params)
    law = fit.law
    print(
        f"fitted on {fit.n_runs} runs: E={law.E:.3f} A={law.A:.4g} B={law.B:.4g} "
        f"alpha={law.alpha:.3f} beta={law.beta:.3f}\nreport: {report}"
    )
    return report
