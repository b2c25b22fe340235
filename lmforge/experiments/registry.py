"""`lmforge runs`: list, filter, compare, tag and delete run directories; pick the best one.

The registry is the run directories themselves (seed 001: 模型管理流程), read on demand: what
a run is comes from the files its command wrote (`run.yaml` for pretrain and `lmforge run`,
`sft.yaml`, `results.json` for eval, `trial.json` for sweep trials), its headline numbers from the
last values in `metrics.jsonl` and its result JSON, its lineage from the model it started from
(`init_from`, `model`). Tags live in `tags.json` beside them. No server, no database.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.config import field_
from lmforge.errors import ConfigError

# Files that make a directory a run, and the command each one means.
_MARKERS = (
    ("trial.json", "sweep trial"),
    ("sft.yaml", "sft"),
    ("run.yaml", "pretrain"),
    ("results.json", "eval"),
    ("sweep.yaml", "sweep"),
    ("summary.json", "run"),
    ("metrics.jsonl", "train"),
)
# Sub-directories that hold a run's artefacts, never other runs.
_SKIP = {"checkpoints", "model", "data", "shards", "tokenizer", "__pycache__"}


def _yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix[:-1]: data} if prefix else {}
    out = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def read_run(path: str | Path) -> dict:
    """Everything the registry knows about one run directory."""
    path = Path(path)
    kind = next((k for name, k in _MARKERS if (path / name).exists()), None)
    if kind is None:
        raise ConfigError(f"{path} is not a run directory (no metrics.jsonl, run.yaml, ...)")
    config: dict = {}
    if kind == "sweep trial":
        trial = _json(path / "trial.json") or {}
        argv = trial.get("argv", [])
        kind = f"sweep trial ({' '.join(a for a in argv[1:3] if not a.startswith('-'))})"
        for arg in argv:
            if arg.startswith("--") and "=" in arg:
                key, _, value = arg[2:].partition("=")
                config[key] = yaml.safe_load(value)
    for name in ("run.yaml", "sft.yaml"):
        if (path / name).is_file():
            config = {**_flatten(_yaml(path / name)), **config}
    if kind == "pretrain" and "pipeline" in config:
        kind = "run"
    metrics: dict[str, Any] = {}
    steps = 0
    if (path / "metrics.jsonl").is_file():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            steps = max(steps, int(record.get("step", 0) or 0))
            metrics.update(
                {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            )
    for name in ("sft.json", "results.json", "summary.json"):
        data = _json(path / name)
        if isinstance(data, dict):
            for key, value in _flatten(data).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics.setdefault(f"{name[:-5]}.{key}", value)
    parent = config.get("init_from") or config.get("model") or None
    tags = _json(path / "tags.json") or []
    finished = (path / "model").is_dir() or (path / "results.json").is_file()
    return {
        "path": str(path),
        "kind": kind,
        "status": "finished" if finished else "partial",
        "steps": steps,
        "metrics": metrics,
        "config": config,
        "parent": parent if isinstance(parent, str) else None,
        "tags": tags,
        "modified": max((f.stat().st_mtime for f in path.iterdir()), default=0.0),
    }


def find_runs(roots: list[str]) -> list[dict]:
    """Every run directory under `roots` (nested runs included, artefact folders skipped)."""
    runs = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise ConfigError(f"root: {root} is not a directory")
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d not in _SKIP and not d.startswith("."))
            if any(name in files for name, _ in _MARKERS):
                runs.append(read_run(directory))
    return runs


_WHERE = re.compile(r"^([\w.:\-]+)\s*(<=|>=|!=|=|<|>|~)\s*(.*)$")


def _value(run: dict, key: str) -> Any:
    for source in (run, run["metrics"], run["config"]):
        if key in source:
            return source[key]
    return None


def matches(run: dict, condition: str) -> bool:
    """`key=value`, `key!=value`, `key<x`, `key>=x`, or `key~substring`; key is a metric, a
    config field (dotted), or kind/status/tags/path."""
    m = _WHERE.match(condition.strip())
    if not m:
        raise ConfigError(f"where: cannot read {condition!r}; write key=value, key<x or key~text")
    key, op, raw = m.groups()
    value = _value(run, key)
    if key == "tags":
        return (raw in value) == (op != "!=")
    if op == "~":
        return raw in str(value)
    if op in ("=", "!="):
        try:
            want = yaml.safe_load(raw)
        except yaml.YAMLError:
            want = raw
        return (value == want or str(value) == raw) == (op == "=")
    if not isinstance(value, (int, float)):
        return False
    x = float(raw)
    return {"<": value < x, ">": value > x, "<=": value <= x, ">=": value >= x}[op]


def select(roots: list[str], where: list[str]) -> list[dict]:
    return [r for r in find_runs(roots) if all(matches(r, w) for w in where)]


def best_run(runs: list[dict], metric: str, mode: str = "min") -> dict:
    """The run with the best `metric`; a clear error when no run has it."""
    have = [r for r in runs if isinstance(r["metrics"].get(metric), (int, float))]
    if not have:
        known = sorted({k for r in runs for k in r["metrics"]})
        close = difflib.get_close_matches(metric, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(known[:20])}"
        raise ConfigError(f"metric: no run has '{metric}'{hint}")
    pick = min if mode == "min" else max
    return pick(have, key=lambda r: r["metrics"][metric])


def diff_configs(runs: list[dict]) -> dict[str, list]:
    """Config fields whose values differ between the runs."""
    keys = sorted({k for r in runs for k in r["config"]})
    return {
        k: [r["config"].get(k) for r in runs]
        for k in keys
        if len({json.dumps(r["config"].get(k), default=str) for r in runs}) > 1
    }


def format_table(runs: list[dict], columns: list[str]) -> str:
    header = ["run", "kind", "status", "steps", *columns, "tags"]
    rows = [header]
    for r in runs:
        cells = [_value(r, c) for c in columns]
        rows.append(
            [
                r["path"],
                r["kind"],
                r["status"],
                str(r["steps"]),
                *(
                    "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                    for v in cells
                ),
                ",".join(r["tags"]),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


@dataclass
class RunsListConfig:
    """List runs under the roots, filtered and sorted."""

    root: list[str] = field_(["runs"], "directories to search for runs")
    where: list[str] = field_([], "conditions: [val_loss<4, train.lr=0.001, kind=pretrain]")
    sort: str = field_("", "sort by this metric or field (ascending)")
    columns: list[str] = field_(["val_loss", "loss"], "metrics or fields to show")


def list_command(config: RunsListConfig) -> list[dict]:
    runs = select(config.root, config.where)
    if config.sort:
        runs.sort(key=lambda r: (_value(r, config.sort) is None, _value(r, config.sort) or 0))
    else:
        runs.sort(key=lambda r: r["modified"])
    print(format_table(runs, config.columns) if runs else "no runs")
    return runs


@dataclass
class RunsCompareConfig:
    """Compare runs: the config fields that differ and their headline metrics."""

    runs: list[str] = field_([], "run directories to compare (two or more)")
    metrics: list[str] = field_(["val_loss", "loss"], "metrics to show")


def compare_command(config: RunsCompareConfig) -> dict:
    if len(config.runs) < 2:
        raise ConfigError("runs: give two or more run directories to compare")
    runs = [read_run(p) for p in config.runs]
    diff = diff_configs(runs)
    lines = [format_table(runs, config.metrics), ""]
    lines += ["config fields that differ:" if diff else "configs are identical"]
    lines += [
        f"  {k}: " + " | ".join(json.dumps(v, default=str) for v in vs) for k, vs in diff.items()
    ]
    lineage = [f"  {r['path']} <- {r['parent']}" for r in runs if r["parent"]]
    if lineage:
        lines += ["started from:", *lineage]
    print("\n".join(lines))
    return {"runs": runs, "diff": diff}


@dataclass
class RunsBestConfig:
    """Print the path of the best run by a metric (usable as --model)."""

    root: list[str] = field_(["runs"], "directories to search for runs")
    metric: str = field_("val_loss", "metric to rank by")
    mode: Literal["min", "max"] = field_("min", "lower or higher is better")
    where: list[str] = field_([], "conditions, as for `lmforge runs list`")


def best_command(config: RunsBestConfig) -> str:
    run = best_run(select(config.root, config.where), config.metric, config.mode)
    # A directory `lmforge.load` accepts: the run's final model when it has one.
    path = Path(run["path"])
    target = str(path / "model") if (path / "model" / "config.yaml").is_file() else str(path)
    print(target)
    return target


@dataclass
class RunsTagConfig:
    """Add or remove tags of a run."""

    run: str = field_("", "run directory")
    add: list[str] = field_([], "tags to add")
    remove: list[str] = field_([], "tags to remove")


def tag_command(config: RunsTagConfig) -> list[str]:
    read_run(config.run)  # a run, or a clear error
    path = Path(config.run) / "tags.json"
    tags = [t for t in (_json(path) or []) if t not in config.remove]
    tags += [t for t in config.add if t not in tags]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(tags) + "\n")
    tmp.replace(path)
    print(f"{config.run}: {', '.join(tags) or '(no tags)'}")
    return tags


@dataclass
class RunsDeleteConfig:
    """Delete run directories (asks for --yes)."""

    runs: list[str] = field_([], "run directories to delete")
    yes: bool = field_(False, "really delete")
    keep_tagged: bool = field_(True, "refuse to delete a run that has tags")


def delete_command(config: RunsDeleteConfig) -> list[str]:
    runs = [read_run(p) for p in config.runs]  # every path is a run before anything goes
    tagged = [r["path"] for r in runs if r["tags"]]
    if config.keep_tagged and tagged:
        raise ConfigError(f"tagged runs are kept (--keep_tagged=false to delete): {tagged}")
    if not config.yes:
        print("would delete:\n  " + "\n  ".join(r["path"] for r in runs) + "\n(add --yes)")
        return []
    for r in runs:
        shutil.rmtree(r["path"])
        print(f"deleted {r['path']}")
    return [r["path"] for r in runs]
