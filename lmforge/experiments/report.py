"""The sweep report: best configurations, counts, parameter importance, parallel coordinates and
the learning curves of the top trials (`sweep_report.md` + PNGs + `sweep.json`)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

from lmforge.report import pyplot, read_metrics


def _trials(sweep) -> list[dict]:
    from optuna.trial import TrialState

    out = []
    for t in sweep.study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL and "failure" not in t.user_attrs:
            continue  # interrupted and re-queued: its retry stands for it
        out.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "params": dict(t.params),
                "dir": t.user_attrs.get("dir"),
                "default": bool(t.user_attrs.get("default")),
                "note": t.user_attrs.get("stopped") or t.user_attrs.get("failure") or "",
                "retry_of": t.user_attrs.get("retry_of"),
            }
        )
    return out


def _rerun(trial: dict) -> str:
    """The trial's command line into a fresh directory (its own would resume, not retrain),
    with the thread count it ran with (fp32 sums depend on it)."""
    record = json.loads((Path(trial["dir"]) / "trial.json").read_text())
    argv = [a for a in record["argv"] if not a.startswith("--out=")]
    argv.append(f"--out={trial['dir']}-rerun")
    return f"OMP_NUM_THREADS={record['threads']} " + shlex.join(argv)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def plot_importance(importance: dict[str, float], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(importance)), dpi=120)
    names = list(importance)[::-1]
    ax.barh(names, [importance[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (PED-ANOVA, normalised)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_parallel(trials: list[dict], params: list, metric: str, path: Path) -> Path:
    """One vertical axis per parameter (log axes for log ranges) plus the metric; each completed
    trial is a line coloured by its metric."""
    plt = pyplot()
    done = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    fig, ax = plt.subplots(figsize=(1.8 * (len(params) + 1) + 1, 4), dpi=120)
    values = [t["value"] for t in done]
    lo, hi = min(values), max(values)
    cmap = plt.get_cmap("viridis_r")
    columns = []
    for p in params:
        raw = [t["params"].get(p.name) for t in done]
        if p.kind == "choice":
            order = {repr(v): i for i, v in enumerate(p.values)}
            scaled = [order[repr(v)] / max(1, len(p.values) - 1) for v in raw]
            labels = [_fmt(v) for v in p.values]
        else:
            f = math.log if p.kind == "loguniform" or p.log else float
            # The axis spans the range and any value outside it (an enqueued default).
            low, high = min([p.low, *raw]), max([p.high, *raw])
            a, b = f(low), f(high)
            scaled = [(f(v) - a) / (b - a) for v in raw]
            labels = [_fmt(low), _fmt(high)]
        columns.append((p.name, scaled, labels))
    columns.append((metric, [(v - lo) / ((hi - lo) or 1) for v in values], [_fmt(lo), _fmt(hi)]))
    for i, t in enumerate(done):
        ys = [col[1][i] for col in columns]
        colour = cmap((t["value"] - lo) / ((hi - lo) or 1))
        ax.plot(range(len(columns)), ys, color=colour, alpha=0.8)
    for x, (_, _, labels) in enumerate(columns):
        ax.axvline(x, color="gray", linewidth=0.8)
        ax.text(x, -0.08, labels[0], ha="center", va="top", fontsize=7)
        ax.text(x, 1.04, labels[-1], ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(columns)), [c[0] for c in columns], fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(trials: list[dict], key: str, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for t in trials:
        records = [r for r in read_metrics(t["dir"]) if key in r and "step" in r]
        if records:
            label = f"#{t['number']} " + ", ".join(f"{k}={_fmt(v)}" for k, v in t["params"].items())
            ax.plot([r["step"] for r in records], [r[key] for r in records], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_sweep_report(sweep, top: int = 5) -> dict:
    """Write sweep_report.md, its figures and sweep.json in the sweep directory."""
    c, out = sweep.config, sweep.out
    trials = _trials(sweep)
    done = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    sign = 1 if c.mode == "min" else -1
    done.sort(key=lambda t: sign * t["value"])
    best = done[0] if done else None
    default = None
    if c.include_default:
        default = next((t for t in trials if t["default"] or t["params"] == sweep.defaults), None)
    counts = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "fail")}
    not_finite = sum(t["note"].startswith(("not finite", "diverging")) for t in trials)
    lines = [
        f"# Sweep: `lmforge {c.command}`, {c.strategy}, {c.metric} ({c.mode})",
        "",
        f"{len(trials)} trials: {counts['complete']} complete, {counts['pruned']} pruned "
        f"({not_finite} of them as diverging: loss non-finite or above its bound), {counts['fail']} failed. "
        f"Pruner: {c.pruner} on `{c.prune_on}`.",
        "",
    ]
    result = {"trials": trials, "counts": counts, "pruned_not_finite": not_finite, "best": None}
    if best:
        result["best"] = {**best, "rerun": _rerun(best)}
        lines += [
            f"**Best**: trial {best['number']}, {c.metric} = {best['value']:.6g}, "
            + ", ".join(f"`{k}={_fmt(v)}`" for k, v in best["params"].items()),
            "",
            f"Run directory: `{best['dir']}`. Rerun: `{result['best']['rerun']}`",
            "",
        ]
        if default and default["value"] is not None:
            delta = sign * (default["value"] - best["value"])
            result["default"] = default
            lines += [
                f"Default values (trial {default['number']}): {c.metric} = "
                f"{default['value']:.6g}; the best is better by {delta:.4g}.",
                "",
            ]
        names = [p.name for p in sweep.params]
        lines += [
            f"| trial | {c.metric} | " + " | ".join(names) + " |",
            "|---:|---:|" + "---:|" * len(names),
        ]
        for t in done[:top]:
            cells = " | ".join(_fmt(t["params"].get(n)) for n in names)
            lines.append(f"| {t['number']} | {t['value']:.6g} | {cells} |")
        lines.append("")
        figures = []
        if len(done) >= 2:
            figures.append(plot_parallel(done, sweep.params, c.metric, out / "parallel.png"))
            figures.append(plot_curves(done[:top], c.prune_on, out / "curves.png"))
        importance = _importance(sweep)
        if importance:
            result["importance"] = importance
            figures.append(plot_importance(importance, out / "importance.png"))
            lines += [
                "Parameter importance: " + ", ".join(f"{k} {v:.2f}" for k, v in importance.items()),
                "",
            ]
        lines += [f"![{f.stem}]({f.name})" for f in figures]
    stopped = [t for t in trials if t["state"] != "complete"]
    if stopped:
        lines += ["", "Stopped early or failed:", ""]
        lines += [f"- trial {t['number']} ({t['state']}): {t['note']}" for t in stopped]
    report = out / "sweep_report.md"
    report.write_text("\n".join(lines) + "\n")
    result["report"] = str(report)
    (out / "sweep.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _importance(sweep) -> dict[str, float]:
    """PED-ANOVA importances (Optuna's default evaluator); empty with too few trials or one
    parameter, where importance says nothing."""
    import optuna

    if len(sweep.params) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(sweep.study))
    except (ValueError, RuntimeError):
        return {}
