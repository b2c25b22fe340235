"""`lmforge runs`: list, filter, compare, tag and delete run directories; pick the best one.

The registry is the run directories themselves (seed 001: 模型管理流程), read on demand: what
a run is comes from the files its command wrote (`run.yaml` for pretrain, `run.yaml` with
`summary.json` for `lmforge run`, `sft.yaml`, `results.json` for eval, `trial.json` for sweep
trials), its headline numbers from the last values in `metrics.jsonl` and its result JSON, its
lineage from the model it started from (`init_from`, `model`). Tags live in `tags.json` beside
them. No server, no database.

Files are taken as they are found: a run with a binary, truncated, malformed or unreadable file,
or a FIFO or device in a file's place, is still listed with what could be read, and its
`problems` name each such file and what is wrong. What is read is bounded: config and result
files by size, the configs' nesting and number of fields, and YAML may not use aliases.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import json
import math
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import yaml

from lmforge.config import field_
from lmforge.errors import ConfigError

# Files that make a directory a run, and the command each one means: the first one present
# names it. summary.json comes before run.yaml because `lmforge run` writes both (and sft/,
# align/, eval/ below), while `lmforge pretrain` writes run.yaml and metrics.jsonl only.
_MARKERS = (
    ("trial.json", "sweep trial"),
    ("sft.yaml", "sft"),
    ("summary.json", "run"),
    ("run.yaml", "pretrain"),
    ("results.json", "eval"),
    ("sweep.yaml", "sweep"),
    ("metrics.jsonl", "train"),
)
# Sub-directories that hold a run's artefacts, never other runs.
_SKIP = {"checkpoints", "model", "data", "shards", "tokenizer", "__pycache__"}

_CHUNK = 1 << 18  # bytes of metrics.jsonl parsed at once (fits in cache: faster than 1 MiB)
_LONGEST = 1 << 20  # a metrics line is ~200 bytes: a longer one is junk, never held whole
_MAX_KEYS = 1000  # metric keys kept: a file of ever new keys must not grow without bound
_MAX_KEY = 200  # characters in a metric key; a longer one is junk
MAX_FILE = 32 << 20  # bytes of a config or result file: they are kilobytes, a bigger one is junk
_MAX_FIELDS = 10_000  # entries of a config or result file walked; a real one has hundreds
_MAX_DEPTH = 32  # levels of nesting walked in one file


def open_regular(path: str | Path) -> BinaryIO:
    """`path` (links followed) opened for binary reading when it is a regular file; anything
    else is an OSError "not a regular file": reading a FIFO waits for a writer, forever, and a
    device such as /dev/zero never ends. The type is checked before opening, so that no device
    is opened (opening some has effects), and again on the descriptor that is read, since the
    path may be replaced in between."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    # Were a FIFO put in its place meanwhile, O_NONBLOCK opens it without waiting for a writer
    # (the check below then refuses it); for a regular file it changes nothing. Windows has no
    # FIFOs to wait on, nor the flag, and needs O_BINARY to leave line ends as they are.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_head(path: str | Path, limit: int) -> tuple[bytes, bool]:
    """The first `limit` bytes of the regular file `path`, and whether it holds more."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    return data[:limit], len(data) > limit


def _text(path: Path, problems: list[str]) -> str | None:
    """The UTF-8 text of a file; None, with the problem noted, when it cannot be used."""
    try:
        data, cut = read_head(path, MAX_FILE)
    except OSError as e:
        problems.append(f"{path.name}: cannot be read ({e.strerror or type(e).__name__})")
        return None
    if cut:
        problems.append(f"{path.name}: larger than {MAX_FILE >> 20} MiB, not read")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(f"{path.name}: not UTF-8 text (binary data at byte {e.start})")
        return None


def _expect(path: Path, data: Any, kind: type, problems: list[str]) -> Any:
    """`data` when it is a `kind`; None, with the problem noted, when it is anything else."""
    if isinstance(data, kind):
        return data
    problems.append(f"{path.name}: expected a {kind.__name__}, found {type(data).__name__}")
    return None


class _Aliased(yaml.YAMLError):
    """A YAML document with an alias (`*name`)."""


class _NoAliases(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing aliases: a few hundred bytes of aliases of aliases
    stand for billions of values once walked (a "billion laughs"), and lmforge never writes
    one (its configs are dumped from fresh dicts and lists)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            line = self.peek_event().start_mark.line + 1
            raise _Aliased(f"YAML aliases are not supported (line {line})")
        return super().compose_node(parent, index)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliases)


def _yaml(path: Path, problems: list[str]) -> dict:
    text = _text(path, problems)
    if text is None:
        return {}
    try:
        data = _load_yaml(text)
    except _Aliased as e:
        problems.append(f"{path.name}: {e}")
        return {}
    except RecursionError:
        problems.append(f"{path.name}: not valid YAML (nested too deeply)")
        return {}
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a date like 2024-13-01
        problems.append(f"{path.name}: not valid YAML ({str(e).splitlines()[0]})")
        return {}
    return _expect(path, data, dict, problems) or {}


def _json(path: Path, problems: list[str], kind: type = dict) -> Any:
    """The JSON `kind` in a file; None, with the problem noted, when it cannot be used."""
    text = _text(path, problems)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        problems.append(f"{path.name}: not valid JSON ({e})")
        return None
    return _expect(path, data, kind, problems)


def _number(value: Any) -> bool:
    # bool is an int subclass, but a flag is not a measurement.
    return type(value) in (int, float)


def _flatten(path: Path, data: dict, problems: list[str]) -> dict[str, Any]:
    """The values of nested dicts as {"a.b.c": value}. At most _MAX_FIELDS entries and
    _MAX_DEPTH levels are walked, so that a file's size bounds the work: what lies beyond is
    left out, and noted."""
    out: dict[str, Any] = {}
    walked = 0
    cut = False

    def walk(node: dict, prefix: str, depth: int) -> None:
        nonlocal walked, cut
        for key, value in node.items():
            walked += 1
            if walked > _MAX_FIELDS:
                cut = True
                return
            if not isinstance(value, dict):
                out[f"{prefix}{key}"] = value
            elif depth < _MAX_DEPTH:
                walk(value, f"{prefix}{key}.", depth + 1)
            else:
                cut = True

    walk(data, "", 1)
    if cut:
        problems.append(
            f"{path.name}: only the first {_MAX_FIELDS} fields and {_MAX_DEPTH} levels are read"
        )
    return out


def _line_chunks(f: BinaryIO) -> Iterator[list[bytes]]:
    """The lines of a binary file, a chunk at a time. A line longer than _LONGEST (binary junk
    with no newline) is never held whole: it comes as the line b"\\0", which is not JSON."""
    rest, skipping = b"", False
    while block := f.read(_CHUNK):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        if skipping and lines:
            lines[0], skipping = b"\0", False  # the end of the long line
        if len(rest) > _LONGEST:
            rest, skipping = b"", True
        yield lines
    if skipping or rest:  # the last line, with no newline after it
        yield [b"\0" if skipping else rest]


def _records(lines: list[bytes]) -> tuple[list[dict], list[int]]:
    """The JSON objects among `lines`, in order, and the indexes of the lines that are not one
    (blank lines are neither). The chunk is parsed as one array first, several times faster
    than line by line; only a chunk where that fails, or gives another count, goes line by
    line."""
    try:
        values = json.loads(b"[" + b",".join(lines) + b"]")
    except (ValueError, RecursionError):
        values = None
    if values is not None and len(values) == len(lines):
        records = [v for v in values if type(v) is dict]
        return records, [i for i, v in enumerate(values) if type(v) is not dict]
    records, bad = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            value = None
        if type(value) is dict:
            records.append(value)
        else:
            bad.append(i)
    return records, bad


def _steps(records: list[dict]) -> tuple[list[int], list[Any]]:
    """The records' steps as ints, and the steps that are not a number (damaged records).
    `"step": null` says there is none, as a missing step does."""
    steps = [r.get("step") for r in records]
    ints = [s for s in steps if type(s) is int]
    odd = []
    if len(ints) < len(steps):
        for s in steps:
            if type(s) is float and math.isfinite(s):
                ints.append(int(s))
            elif s is not None and type(s) is not int:
                odd.append(s)
    return ints, odd


def _last_numbers(records: list[dict]) -> dict[str, Any]:
    """The last numeric value of each key of the records (in line order)."""
    keys = set().union(*records)
    found: dict[str, Any] = {}
    # Newest first: a key's first number found is its last one. A training log's records share
    # their keys, so every key has one after the last few records and the scan stops there.
    for record in reversed(records):
        if len(found) == len(keys):
            break
        if record.keys() <= found.keys():
            continue
        for key, value in record.items():
            if key not in found and _number(value):
                found[key] = value
    return found


def _metrics(path: Path, problems: list[str]) -> tuple[dict[str, Any], int]:
    """The last numeric value of each key in a metrics.jsonl, and its largest step. The file is
    streamed and only these are kept: a long run logs millions of lines."""
    last: dict[str, Any] = {}
    steps = lines_read = bad_lines = first_bad = bad_steps = 0
    odd_step, too_many = None, False
    try:
        with open_regular(path) as f:
            for lines in _line_chunks(f):
                records, bad = _records(lines)
                if bad:
                    first_bad = first_bad or lines_read + bad[0] + 1
                    bad_lines += len(bad)
                lines_read += len(lines)
                ints, odd = _steps(records)
                if ints:
                    steps = max(steps, max(ints))
                if odd:
                    odd_step = odd_step if bad_steps else odd[0]
                    bad_steps += len(odd)
                for key, value in _last_numbers(records).items():
                    if key == "step":
                        continue
                    if key in last or (len(last) < _MAX_KEYS and len(key) <= _MAX_KEY):
                        last[key] = value
                    else:
                        too_many = True
    except OSError as e:
        problems.append(f"metrics.jsonl: cannot be read ({e.strerror or e})")
    if bad_lines:
        problems.append(
            f"metrics.jsonl: {bad_lines} line(s) are not JSON objects (first: line {first_bad})"
        )
    if bad_steps:
        problems.append(
            f"metrics.jsonl: {bad_steps} record(s) have a step that is not a number "
            f"(such as {str(odd_step)[:40]!r})"
        )
    if too_many:
        problems.append(
            f"metrics.jsonl: keys beyond the first {_MAX_KEYS}, or longer than {_MAX_KEY} "
            "characters, are left out"
        )
    return last, steps


def _trial_config(path: Path, problems: list[str]) -> tuple[str, dict]:
    """The command of a sweep trial and the values its command line set."""
    trial = _json(path / "trial.json", problems) or {}
    argv = trial.get("argv", [])
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        problems.append("trial.json: argv is not a list of strings")
        argv = []
    config = {}
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            key, _, value = arg[2:].partition("=")
            try:
                config[key] = _load_yaml(value)
            except (yaml.YAMLError, ValueError, RecursionError):
                config[key] = value  # a damaged value is still worth showing, as the text it is
    command = " ".join(a for a in argv[1:3] if not a.startswith("-"))
    return f"sweep trial ({command})", config


def _modified(path: Path) -> float:
    """The newest modification time of the run's entries; one that cannot be stat'ed (a
    dangling link, a file removed meanwhile) is passed over."""
    newest = 0.0
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat().st_mtime)
    return newest


def _finished(path: Path) -> bool:
    """Whether the run wrote its final model or its evaluation results; False when that cannot
    be told (a folder that may be listed but not entered)."""
    try:
        return (path / "model").is_dir() or (path / "results.json").is_file()
    except OSError:
        return False


def read_run(path: str | Path) -> dict:
    """Everything the registry knows about one run directory. Damaged files do not make it
    fail: what they should have said is missing, and `problems` names them."""
    path = Path(path)
    # The kind comes from the names in the folder, as find_runs found it: a folder whose
    # entries cannot be looked at (no search permission, a marker that is a dangling link) is
    # still the run it names, with problems, rather than an error that ends the listing.
    try:
        names = set(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        names = set()
    except OSError as e:
        raise ConfigError(f"{path}: the directory cannot be read ({e.strerror})") from None
    kind = next((k for name, k in _MARKERS if name in names), None)
    if kind is None:
        raise ConfigError(f"{path} is not a run directory (no metrics.jsonl, run.yaml, ...)")
    problems: list[str] = []
    config: dict = {}
    if kind == "sweep trial":
        kind, config = _trial_config(path, problems)
    # Only files the folder lists are read: in one that cannot be entered, every other name
    # would be "Permission denied" too.
    for name in ("run.yaml", "sft.yaml"):
        if name in names:
            config = {**_flatten(path / name, _yaml(path / name, problems), problems), **config}
    metrics: dict[str, Any] = {}
    steps = 0
    if "metrics.jsonl" in names:
        metrics, steps = _metrics(path / "metrics.jsonl", problems)
    for name in ("sft.json", "results.json", "summary.json"):
        if name not in names:
            continue
        data = _json(path / name, problems) or {}
        for key, value in _flatten(path / name, data, problems).items():
            if _number(value):
                metrics.setdefault(f"{name[:-5]}.{key}", value)
    parent = config.get("init_from") or config.get("model") or None
    tags = (_json(path / "tags.json", problems, list) or []) if "tags.json" in names else []
    if not all(isinstance(t, str) for t in tags):
        problems.append("tags.json: tags are not all text")
        tags = [t for t in tags if isinstance(t, str)]
    return {
        "path": str(path),
        "kind": kind,
        "status": "finished" if _finished(path) else "partial",
        "steps": steps,
        "metrics": metrics,
        "config": config,
        "parent": parent if isinstance(parent, str) else None,
        "tags": tags,
        "modified": _modified(path),
        "problems": problems,
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
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    # A damaged file leaves cells empty: say which file, so a blank is not taken for "not logged".
    notes = [f"  {r['path']}: {p}" for r in runs for p in r["problems"]]
    return "\n".join([*lines, *(["", "problems:", *notes] if notes else [])])


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
    run = read_run(config.run)  # a run, or a clear error
    path = Path(config.run) / "tags.json"
    tags = [t for t in run["tags"] if t not in config.remove]
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
