"""Run report card: loss curves as PNG and a Markdown summary beside them."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(
    metrics: list[dict], path: Path, *, baseline: float | None = None, baseline_label: str = ""
) -> Path:
    """Training loss (raw and smoothed) and validation loss against tokens seen."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    train = [(m["tokens"], m["loss"]) for m in metrics if "loss" in m]
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, linewidth=0.8)
        smooth, ema = [], ys[0]
        for y in ys:  # exponential moving average makes the trend readable
            ema = 0.9 * ema + 0.1 * y
            smooth.append(ema)
        ax.plot(xs, smooth, color="tab:blue", label="train loss (EMA)")
    val = [(m["tokens"], m["val_loss"]) for m in metrics if "val_loss" in m]
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", color="tab:orange", label="validation loss")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=baseline_label)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_report(
    run_dir: str | Path,
    title: str,
    facts: dict[str, object],
    samples: list[tuple[str, str]] = (),
    *,
    baseline: float | None = None,
    baseline_label: str = "",
    notes: str = "",
    sections: list[tuple[str, str]] = (),
) -> Path:
    """Write `report.md` (and `loss.png`) in run_dir from its metrics and the given facts;
    `sections` are further (title, Markdown body) pairs appended at the end."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in facts.items()]
    if metrics:
        plot_losses(metrics, run_dir / "loss.png", baseline=baseline, baseline_label=baseline_label)
        lines += ["", "## Loss", "", "![loss curves](loss.png)"]
    if samples:
        lines += ["", "## Samples", ""]
        for prompt, text in samples:
            body = (prompt + text).replace("```", "'''")
            lines += [f"**Prompt:** `{prompt}`", "", "```text", body, "```", ""]
    for title, body in sections:
        lines += ["", f"## {title}", "", body.rstrip(), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
