"""`lmforge ui RUNS_DIR`: a runs browser in the web page. It lists every run under a folder with
its stages and headline numbers, opens a run's report card (curves, evaluation tables with their
items, data-pipeline statistics, configs, report.md) and draws several runs' curves on one plot.

The server only ever reads. Every path a request names is relative to RUNS_DIR and is resolved
(symlinks followed) before use; what lands outside RUNS_DIR is refused, so the page cannot be
turned into a reader of the rest of the machine. Files are taken as they are found: a missing,
truncated, binary or unreadable file, or a FIFO or device in a file's place, is reported as such
instead of failing (or hanging) the page, and a metrics.jsonl of any length is streamed and
reduced to a bounded number of points per curve. Errors name files relative to RUNS_DIR only.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import yaml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from lmforge.config import field_
from lmforge.errors import ConfigError, LmforgeError
from lmforge.experiments import registry
from lmforge.web import add_static

DEFAULT_POINTS = 1000
MAX_POINTS = 20_000
MAX_KEYS = 64  # numeric keys plotted per file: a file with thousands of keys stays bounded
MAX_JSON = 32 << 20  # result JSONs are kilobytes; a bigger one is not what it claims to be
MAX_TEXT = 1 << 20  # configs and report.md shown in the page
MAX_STRING = 20_000  # one string of a sample (a prompt, a generation)
CHUNK = 1 << 20  # bytes of JSONL parsed at once
MAX_LINE = 8 << 20  # a sample line with a long few-shot prompt is ~100 KB
MAX_IMAGE = 20 << 20  # report.md's loss.png is ~50 KB
MAX_DEPTH = 32  # levels of nesting sent: Python and the JSON encoder recurse, with a limit
_IMAGES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}

# The kind of a stage directory: that of the first of these files it holds.
_KINDS = (
    ("summary.json", "run"),
    ("report.md", "run"),
    ("run.yaml", "pretrain"),
    ("sft.yaml", "sft"),
    ("sft.json", "sft"),
    ("dpo.yaml", "align"),
    ("dpo.json", "align"),
    ("results.json", "eval"),
    ("stats.json", "data"),
    ("sweep.yaml", "sweep"),
    ("trial.json", "sweep trial"),
    ("metrics.jsonl", "train"),
)
# What each kind of stage writes: an expected file that is not there is shown as missing.
_EXPECTED = {
    "run": ("run.yaml", "summary.json", "metrics.jsonl", "report.md"),
    "pretrain": ("run.yaml", "metrics.jsonl"),
    "sft": ("sft.yaml", "sft.json", "metrics.jsonl"),
    "align": ("dpo.yaml", "dpo.json", "metrics.jsonl"),
    "eval": ("results.json", "samples.jsonl"),
    "data": ("stats.json",),
    "sweep": ("sweep.yaml",),
    "sweep trial": ("trial.json",),
    "train": ("metrics.jsonl",),
}
_CONFIGS = ("run.yaml", "sft.yaml", "dpo.yaml", "sweep.yaml", "pipeline.yaml")
_SUMMARIES = ("summary.json", "sft.json", "dpo.json", "trial.json")
_KNOWN = (*_CONFIGS, *_SUMMARIES, "metrics.jsonl", "results.json", "samples.jsonl", "stats.json")
# What makes a directory a run: the registry's markers, and the data pipeline's statistics.
_MARKERS = {name for name, _ in registry._MARKERS} | {"stats.json"}
# The files registry.read_run opens: each must be inside RUNS_DIR before it may read them.
_REGISTRY_FILES = (
    "trial.json",
    "run.yaml",
    "sft.yaml",
    "metrics.jsonl",
    "sft.json",
    "results.json",
    "summary.json",
    "tags.json",
)
_NUMBER = (int, float)
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")  # C:\ or C:/, absolute on Windows


class Refused(LmforgeError):
    """A request the browser will not answer: `status` is the HTTP status it gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Unreadable(Exception):
    """A file that is there but cannot be used; the message says why."""


# ---------------------------------------------------------------------------------------------
# Reading files defensively


def _number(value: Any) -> bool:
    # bool is an int subclass, but a flag is not a measurement.
    return type(value) in _NUMBER


def _clean(value: Any, depth: int = 0) -> Any:
    """JSON-safe: NaN and infinities become their names (strict JSON has no such numbers), any
    other non-JSON value its str(), and what is nested deeper than MAX_DEPTH "[...]"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (dict, list, tuple)) and depth >= MAX_DEPTH:
        return "[...]"
    if isinstance(value, dict):
        return {str(k): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, depth + 1) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _reason(e: BaseException) -> str:
    """What went wrong, for an answer: the system's words for an OSError, else the kind of
    error. Never str(e): an exception may carry the absolute path of a file, which would tell
    a client where on the server the runs are."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return type(e).__name__


def _decode(data: bytes, truncated: bool) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        # A cut through a multi-byte character at the size limit is not corruption.
        if truncated and e.start >= len(data) - 3:
            return data[: e.start].decode("utf-8")
        raise Unreadable(f"not UTF-8 text (binary data at byte {e.start})") from None


def read_text(path: Path, limit: int = MAX_TEXT) -> tuple[str, bool]:
    """The text of the regular file `path` up to `limit` bytes, and whether it was cut there."""
    try:
        data, truncated = registry.read_head(path, limit)
    except OSError as e:
        raise Unreadable(_reason(e)) from None
    return _decode(data, truncated), truncated


def read_json(path: Path) -> dict:
    """A JSON object file; anything else (truncated, a list, binary) is Unreadable."""
    text, cut = read_text(path, MAX_JSON)
    if cut:
        raise Unreadable(f"too large for a result file (over {MAX_JSON >> 20} MiB)")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise Unreadable(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise Unreadable(f"expected a JSON object, found {type(data).__name__}")
    return data


def _lines(path: Path, limit: int | None = None) -> Iterator[list[bytes]]:
    """Chunks of the non-blank lines of `path`, streamed, the first `limit` lines at most. A line
    longer than MAX_LINE (binary junk with no newline) is never held whole: it stands as one
    unreadable line."""
    seen, rest, cut = 0, b"", False
    with registry.open_regular(path) as f:
        while limit is None or seen < limit:
            block = f.read(CHUNK)
            lines = (rest + block).split(b"\n")
            rest = lines.pop() if block else b""  # at the end, the last piece is a line too
            if cut and lines:
                lines[0], cut = b"\0", False  # the end of the long line: not JSON
            if len(rest) > MAX_LINE:
                rest, cut = b"", True
            if limit is not None:
                lines = lines[: limit - seen]
            seen += len(lines)
            yield [line for line in lines if line.strip()]
            if not block:
                return


def _parse(lines: list[bytes]) -> list[Any]:
    """JSON values of the lines, None for a line that is not JSON. The whole chunk is parsed as
    one array first (five times faster than line by line); only a chunk with a bad line, or one
    whose count comes out different, is parsed again line by line."""
    if not lines:
        return []
    try:
        values = json.loads(b"[" + b",".join(lines) + b"]")
        if len(values) == len(lines):
            return values
    except (ValueError, RecursionError):
        pass
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except (ValueError, RecursionError):
            out.append(None)
    return out


def _count_lines(path: Path) -> int:
    count = 0
    last = b"\n"
    with registry.open_regular(path) as f:
        while block := f.read(CHUNK):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _floats(values: list[Any]) -> tuple[np.ndarray, int]:
    """float64 array (NaN where a value is missing or not a number) and how many were numbers."""
    numeric = [v if type(v) in _NUMBER else None for v in values]
    present = len(numeric) - numeric.count(None)
    try:
        return np.array(numeric, dtype=np.float64), present
    except OverflowError:  # an integer beyond float range (JSON allows any length)
        return np.array(
            [
                (math.inf if v > 0 else -math.inf) if v is not None and abs(v) > 1e308 else v
                for v in numeric
            ],
            dtype=np.float64,
        ), present


def _extremes(bucket: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows holding the smallest and the largest value (columns[0]) of each bucket."""
    order = np.lexsort((columns[0], bucket))
    b = bucket[order]
    edge = b[1:] != b[:-1]
    keep = order[np.r_[True, edge] | np.r_[edge, True]]
    return (bucket[keep], *(c[keep] for c in columns))


class _Series:
    """The kept points of one key: per bucket of lines, its min and max rows (so a spike of one
    step survives any reduction), plus its first and last rows (so the curve spans the whole
    run), merged chunk by chunk in bounded memory."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.first: tuple[np.ndarray, ...] | None = None
        self.last: tuple[np.ndarray, ...] | None = None
        self.count = 0
        self.nonfinite = 0

    def add(self, bucket, y, x, line) -> None:
        """Rows of one chunk, in line order."""
        self.parts.append(_extremes(bucket, y, x, line))
        self.first = self.first or (y[:1], x[:1], line[:1])
        self.last = (y[-1:], x[-1:], line[-1:])

    def points(self) -> tuple[list, list]:
        if not self.parts:
            return [], []
        bucket, y, x, line = (np.concatenate(c) for c in zip(*self.parts))
        _, y, x, line = _extremes(bucket, y, x, line)
        y, x, line = (np.concatenate(c) for c in zip((y, x, line), self.first, self.last))
        line, keep = np.unique(line, return_index=True)  # sorted by line, each line once
        xs = [int(v) if v.is_integer() else v for v in x[keep].tolist()]
        return xs, y[keep].tolist()


def read_metrics(path: Path, points: int = DEFAULT_POINTS, keys: set[str] | None = None) -> dict:
    """Every numeric key of a metrics.jsonl as a curve against `step`, at most `points` points
    each: lines are grouped into buckets of equal size and each bucket keeps its extremes.
    `keys` limits the curves computed (all keys are still listed)."""
    total = _count_lines(path)  # fixes the buckets; lines appended while reading wait for later
    # Two points (min, max) per bucket and two more for the first and last rows.
    width = 1 if total <= points else -(-total // ((points - 2) // 2))
    series: dict[str, _Series] = {}
    numeric: dict[str, None] = {}  # keys with a number somewhere, in order of appearance
    dropped: set[str] = set()  # keys past MAX_KEYS
    line = records = bad = 0
    for chunk in _lines(path, total):
        values = _parse(chunk)
        index = [line + i for i, v in enumerate(values) if type(v) is dict]
        rows = [v for v in values if type(v) is dict]
        line += len(values)
        bad += len(values) - len(rows)
        records += len(rows)
        if not rows:
            continue
        index = np.array(index)
        bucket = index // width
        steps, _ = _floats([r.get("step") for r in rows])
        steps = np.where(np.isfinite(steps), steps, index + 1)  # no usable step: the line number
        for key in dict.fromkeys(chain.from_iterable(rows)):
            if key == "step" or key in dropped:
                continue
            if key not in numeric:
                if not any(type(r.get(key)) in _NUMBER for r in rows):
                    continue
                if len(numeric) >= MAX_KEYS or len(key) > 200:
                    dropped.add(key)
                    continue
                numeric[key] = None
            if keys is not None and key not in keys:
                continue
            y, present = _floats([r.get(key) for r in rows])
            s = series.setdefault(key, _Series())
            finite = np.isfinite(y)
            s.count += present
            s.nonfinite += present - int(finite.sum())
            if finite.any():
                s.add(bucket[finite], y[finite], steps[finite], index[finite])
    out = {}
    for key, s in series.items():
        x, y = s.points()
        out[key] = {"x": x, "y": y, "count": s.count, "nonfinite": s.nonfinite}
    return {
        "lines": line,
        "records": records,
        "bad_lines": bad,
        "points": points,
        "bucket_lines": width,
        "keys": list(numeric),
        "keys_dropped": len(dropped),
        "series": out,
    }


def _clip(value: Any, depth: int = 0) -> Any:
    """A sample record small enough to show: long strings cut, long lists shortened, deep
    nesting cut off."""
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else value[:MAX_STRING] + " [...]"
    if isinstance(value, list):
        if depth > 8:
            return "[...]"
        return [_clip(v, depth + 1) for v in value[:200]] + (["[...]"] if len(value) > 200 else [])
    if isinstance(value, dict):
        if depth > 8:
            return "{...}"
        return {str(k): _clip(v, depth + 1) for k, v in list(value.items())[:200]}
    return _clean(value)


def _text(value: Any, depth: int = 0) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[...]" if depth >= MAX_DEPTH else " | ".join(_text(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return json.dumps(_clean(value), ensure_ascii=False)
    return str(value)


def _first(record: dict, *names: str) -> Any:
    return next((record[n] for n in names if record.get(n) not in (None, "")), None)


def sample_view(record: dict) -> dict:
    """The prompt, gold answer, prediction and scores of one sample line, whichever writer made
    it: the evaluation harness (multiple choice, log-likelihood, generation), SFT or alignment."""
    choices = record.get("choices")
    choices = choices if isinstance(choices, list) else None

    def choice(i: Any) -> Any:
        # Only an int indexes: a float (1.0, NaN) is shown as the value it is.
        return choices[i] if type(i) is int and 0 <= i < len(choices) else i

    gold = record.get("gold")
    if choices is not None and gold is not None:
        gold = [choice(i) for i in gold] if isinstance(gold, list) else choice(gold)
    else:
        gold = _first(record, "target", "gold", "continuation", "reference")
    pred = record.get("pred")
    if choices is not None and pred is not None:
        pred = choice(pred)
    else:
        generations = record.get("generations")
        pred = generations[0] if isinstance(generations, list) and generations else None
        pred = pred if pred is not None else _first(record, "output", "answer", "pred")
        if pred is None and isinstance(record.get("is_greedy"), bool):
            # A log-likelihood item generates nothing: what it predicts is whether the gold
            # continuation is the model's greedy one.
            pred = "greedy" if record["is_greedy"] else "not the greedy continuation"
    scores = record.get("scores")
    if not isinstance(scores, dict):
        scores = {k: record[k] for k in ("correct", "reward", "score") if k in record}
    extracted = record.get("extracted")
    return {
        "index": record.get("index") if type(record.get("index")) is int else None,
        "task": _text(record.get("task")),
        "prompt": _clip(_text(_first(record, "prompt", "question", "input", "text"))),
        "gold": _clip(_text(gold)),
        "pred": _clip(_text(pred)),
        "extracted": _clip(_text(extracted)) if extracted is not None else None,
        "scores": _clean({str(k): v for k, v in scores.items()}),
        "record": _clip(record),
    }


def read_samples(path: Path, task: str | None, offset: int, limit: int) -> dict:
    """One page of a samples.jsonl (of one task, or all lines), with the total that match."""
    items, total, bad = [], 0, 0
    for chunk in _lines(path):
        for record in _parse(chunk):
            if not isinstance(record, dict):
                bad += 1
                continue
            if task is not None and record.get("task") != task:
                continue
            if offset <= total < offset + limit:
                items.append({"position": total, **sample_view(record)})
            total += 1
    return {"total": total, "offset": offset, "limit": limit, "bad_lines": bad, "items": items}


def eval_table(results: dict) -> list[dict]:
    """results.json's `results`: per task its size and each metric with its standard error."""
    table = results.get("results")
    if not isinstance(table, dict):
        raise Unreadable("no 'results' object")
    rows = []
    for task, metrics in table.items():
        if not isinstance(metrics, dict):
            continue
        rows.append(
            {
                "task": str(task),
                "n": metrics.get("n") if _number(metrics.get("n")) else None,
                "metrics": [
                    {
                        "name": str(name),
                        "value": value,
                        "stderr": metrics.get(f"{name}_stderr"),
                    }
                    for name, value in metrics.items()
                    if name != "n"
                    and not str(name).endswith("_stderr")
                    and (_number(value) or value is None)
                ],
            }
        )
    return _clean(rows)


def data_table(stats: dict) -> dict:
    """stats.json of the data pipeline: per cleaning step documents and characters in and out,
    removal reasons and a few removed examples."""
    steps = stats.get("steps")
    if not isinstance(steps, dict):
        raise Unreadable("no 'steps' object")
    rows = []
    for name, st in steps.items():
        st = st if isinstance(st, dict) else {}
        examples = st.get("examples") if isinstance(st.get("examples"), list) else []
        rows.append(
            {
                "step": str(name),
                **{k: st.get(k) for k in ("docs_in", "docs_out", "chars_in", "chars_out")},
                "reasons": st.get("reasons") if isinstance(st.get("reasons"), dict) else {},
                "counts": st.get("counts") if isinstance(st.get("counts"), dict) else {},
                "examples": [
                    {k: _text(ex.get(k))[:500] for k in ("id", "reason", "text")}
                    for ex in examples[:5]
                    if isinstance(ex, dict)
                ],
            }
        )
    info = stats.get("input")
    return _clean(
        {
            "steps": rows,
            "input": info if isinstance(info, dict) else {},
            "input_shards": stats.get("input_shards"),
            "output_documents": stats.get("output_documents"),
        }
    )


def _scalars(data: dict, prefix: str = "", out: list | None = None, depth: int = 0) -> list:
    """[key, value] rows of a result JSON's scalars (its config is shown apart), 300 at most;
    an object nested deeper than MAX_DEPTH is shown as "{...}"."""
    out = [] if out is None else out
    for key, value in data.items():
        if len(out) >= 300:
            break
        name = f"{prefix}{key}"
        if name == "config":
            continue
        if isinstance(value, dict) and depth >= MAX_DEPTH:
            out.append([name, "{...}"])
        elif isinstance(value, dict):
            _scalars(value, f"{name}.", out, depth + 1)
        elif isinstance(value, list):
            simple = all(v is None or isinstance(v, (str, int, float, bool)) for v in value)
            short = simple and len(value) <= 10
            out.append([name, json.dumps(_clean(value)) if short else f"[{len(value)} items]"])
        else:
            out.append([name, value[:300] if isinstance(value, str) else value])
    return _clean(out)


class _Cache:
    """A small in-memory LRU: a file is read again only when its size or mtime changed."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key: Any, compute: Callable[[], Any], keep: bool = True) -> Any:
        """The cached value, or compute() (kept for next time if `keep`)."""
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = compute()
        if not keep:
            return value
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (None,)
    return (st.st_mtime_ns, st.st_size)


# ---------------------------------------------------------------------------------------------
# The runs folder


class RunsDir:
    """RUNS_DIR as the API sees it: run discovery, one run's stages, and the guard that every
    path stays inside."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self._runs = _Cache(1024)
        self._metrics = _Cache(16)

    # -- paths ------------------------------------------------------------------------------

    def inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.root)
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            return False

    def resolve(self, rel: str, *, file: str | None = None) -> Path:
        """The directory `rel` (relative to the root; "." is the root) or the file `file` in it:
        403 for an absolute path, `..` or anything that resolves outside; 404 if not there."""
        parts = [*rel.replace("\\", "/").split("/"), *([file] if file is not None else [])]
        if rel.startswith(("/", "\\")) or _DRIVE.match(rel) or "\0" in rel:
            raise Refused(403, f"path {rel!r} is not relative to the runs directory")
        if ".." in parts:
            raise Refused(403, f"path {rel!r} climbs out with '..'")
        path = self.root / rel
        if file is not None:
            path = path / file
        if not self.inside(path):
            raise Refused(403, f"path {rel!r} leads outside the runs directory")
        target = path.resolve()
        what = f"{file} in {rel!r}" if file is not None else f"directory {rel!r}"
        try:
            there = target.is_file() if file is not None else target.is_dir()
        except OSError as e:  # a name too long for the file system, a folder not to be entered
            status = 400 if e.errno == errno.ENAMETOOLONG else 422
            raise Refused(status, f"cannot open {what}: {_reason(e)}") from None
        if not there:
            raise Refused(404, f"no {what}")
        return target

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if path != self.root else "."

    # -- discovery ----------------------------------------------------------------------------

    def _walk(self) -> list[Path]:
        """Directories holding a run marker. Symlinked folders are not entered (os.walk's
        default): they may lead anywhere; run directories are real folders."""
        found = []
        for directory, subdirs, files in os.walk(self.root):
            subdirs[:] = sorted(d for d in subdirs if d not in registry._SKIP and d[0] != ".")
            if _MARKERS.intersection(files):
                found.append(Path(directory))
        return found

    def _children(self, run: Path) -> list[Path]:
        """Sub-directories of a run that are runs themselves (sft/, align/, eval/ of `lmforge
        run`): shown as its stages. Links are not followed, as in _walk."""
        try:
            with os.scandir(run) as entries:
                names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            return []
        return [
            run / name
            for name in names
            if name not in registry._SKIP
            and not name.startswith(".")
            and _MARKERS.intersection(_names(run / name))
        ]

    def _data_dir(self, run: Path) -> Path | None:
        """Where `lmforge run` keeps the data pipeline's statistics."""
        for d in (run / "data" / "out", run / "data"):
            if "stats.json" in _names(d) and self.inside(d):
                return d
        return None

    def registry_info(self, directory: Path) -> dict:
        """registry.read_run of the directory, or as much as can be said when it fails: its
        files may be corrupt, or lead outside the root (then they are not read at all)."""
        files = (directory, *(directory / n for n in _REGISTRY_FILES))
        key = (str(directory), *(_stamp(f) for f in files))
        return self._runs.get(key, lambda: self._read_registry(directory))

    def _read_registry(self, directory: Path) -> dict:
        names = _names(directory)
        outside = [n for n in _REGISTRY_FILES if n in names and not self.inside(directory / n)]
        error = None
        if outside:
            error = f"{', '.join(outside)} lead(s) outside the runs directory"
        elif names.intersection(n for n, _ in registry._MARKERS):
            try:
                info = registry.read_run(directory)
            except Exception as e:  # noqa: BLE001 - a corrupt run must not take the list down
                error = f"unreadable ({_reason(e)})"
            else:
                # The registry reads damaged files as far as they go and names each in
                # `problems`: the run's error, in the list and on its page.
                return {**info, "error": "; ".join(info["problems"]) or None}
        return {
            "path": str(directory),
            "kind": None,
            "status": "partial",
            "steps": 0,
            "metrics": {},
            "config": {},
            "parent": None,
            "tags": [],
            "modified": _modified(directory),
            "error": error,
        }

    # -- one stage ---------------------------------------------------------------------------

    def _file_state(self, directory: Path, name: str, names: set[str]) -> tuple[Path | None, dict]:
        """The file `name` of `directory` (whose entries are `names`) if it may be read, and
        its state: missing, refused (it leads outside), unreadable (with a note) or ok."""
        path = directory / name
        entry: dict[str, Any] = {"name": name}
        if name not in names:
            return None, {**entry, "state": "missing"}
        if not self.inside(path):
            return None, {**entry, "state": "refused", "note": "leads outside the runs directory"}
        try:
            st = path.stat()
        except OSError as e:  # a dangling link, a folder that cannot be entered
            return None, {**entry, "state": "unreadable", "note": _reason(e)}
        if not stat.S_ISREG(st.st_mode):  # a FIFO would hang its reader, a device never end
            return None, {**entry, "state": "unreadable", "note": "not a regular file"}
        return path, {**entry, "state": "ok", "size": st.st_size}

    def stage(self, name: str, directory: Path) -> dict:
        """What one stage directory holds: its files and their state, configs, summary numbers,
        evaluation table, data statistics, report; curves and samples are fetched apart."""
        entries = _names(directory)
        kind = _kind(entries)
        present = [n for n in (*_KNOWN, "report.md") if n in entries]
        files, out = [], {}
        names = dict.fromkeys([*_EXPECTED.get(kind, ()), *present])
        for file in names:
            path, entry = self._file_state(directory, file, entries)
            files.append(entry)
            if path is None:
                continue
            try:
                self._read_into(out, file, path, entry)
            except Unreadable as e:
                entry.update(state="unreadable", note=str(e))
            except OSError as e:
                entry.update(state="unreadable", note=_reason(e))
        if "configs" not in out and isinstance(out.get("result_config"), dict):
            text = json.dumps(_clean(out["result_config"]), indent=2, ensure_ascii=False)
            out["configs"] = [{"name": "results.json: config", "text": text, "truncated": False}]
        out.pop("result_config", None)
        return {"name": name, "path": self.rel(directory), "kind": kind, "files": files, **out}

    def _read_into(self, out: dict, name: str, path: Path, entry: dict) -> None:
        if name in _CONFIGS:
            text, cut = read_text(path)
            out.setdefault("configs", []).append({"name": name, "text": text, "truncated": cut})
            try:
                yaml.safe_load(text) if not cut else None
            except RecursionError:
                raise Unreadable("not valid YAML (nested too deeply)") from None
            except (yaml.YAMLError, ValueError) as e:  # ValueError: a date like 2024-13-01
                raise Unreadable(f"not valid YAML ({str(e).splitlines()[0]})") from None
        elif name in _SUMMARIES:
            data = read_json(path)
            out.setdefault("summary", []).append({"name": name, "values": _scalars(data)})
        elif name == "results.json":
            data = read_json(path)
            out["result_config"] = data.get("config")
            out["eval"] = eval_table(data)
        elif name == "stats.json":
            out["data"] = data_table(read_json(path))
        elif name == "report.md":
            text, cut = read_text(path)
            out["report"] = {"text": text, "truncated": cut}
        elif name == "metrics.jsonl":
            out["metrics"] = True
        elif name == "samples.jsonl":
            out["samples"] = True
        if entry.get("state") == "ok" and name.endswith(".jsonl") and entry["size"] == 0:
            entry["note"] = "empty"

    # -- API answers -------------------------------------------------------------------------

    def _stages(self, run: Path, children: list[Path]) -> list[tuple[str, Path]]:
        # The run's own directory holds the pre-training of `lmforge run`: named for that.
        kind = _kind(_names(run))
        stages = [("pretrain" if kind == "run" else kind, run), *((c.name, c) for c in children)]
        data = self._data_dir(run)
        if data is not None and data != run:
            stages.append(("data", data))
        return stages

    def _summary(self, run: Path, children: list[Path], stages: list[dict]) -> dict:
        info = self.registry_info(run)
        parts = [(c.name, self.registry_info(c)) for c in children]
        evals = [s for s in stages if s.get("eval")]
        # The registry tells a sweep trial's command; for the rest the stage's files tell more
        # (the registry has no kind for alignment, nor for the data pipeline's statistics).
        trial = (info["kind"] or "").startswith("sweep trial")
        return {
            "path": self.rel(run),
            "name": run.name,
            "kind": info["kind"] if trial else stages[0]["kind"],
            "status": info["status"],
            "steps": info["steps"],
            "modified": max([info["modified"], *(p["modified"] for _, p in parts)]),
            "parent": info["parent"],
            "tags": [str(t) for t in info["tags"]] if isinstance(info["tags"], list) else [],
            "headline": _clean(_headline(info, parts, evals)),
            "error": info["error"],  # what the registry could not read (see _read_registry)
        }

    def list_runs(self) -> dict:
        found = self._walk()
        marked = set(found)
        below: dict[Path, list[Path]] = {}  # the stages of each run, found in one pass
        for directory in found:
            if directory != self.root:
                below.setdefault(directory.parent, []).append(directory)
        runs = []
        for run in found:
            if run.parent in marked and run != self.root:
                continue  # a stage of the run above it
            children = below.get(run, [])
            stages = [self.stage(n, d) for n, d in self._stages(run, children)]
            problems = [
                {"file": f"{s['path']}/{f['name']}", "state": f["state"], "note": f.get("note")}
                for s in stages
                for f in s["files"]
                if f["state"] != "ok"
            ]
            runs.append(
                {
                    **self._summary(run, children, stages),
                    "stages": [{"name": s["name"], "kind": s["kind"]} for s in stages],
                    "problems": problems,
                }
            )
        return {"root": self.root.name, "runs": runs}

    def run(self, rel: str) -> dict:
        run = self.resolve(rel)
        children = self._children(run)
        stages = [self.stage(n, d) for n, d in self._stages(run, children)]
        if all(s["kind"] == "files" for s in stages):
            try:  # nothing found: say so, unless the folder could not be looked into
                os.listdir(run)
            except OSError as e:
                raise Refused(422, f"cannot read directory {rel!r}: {_reason(e)}") from None
            raise Refused(404, f"{rel!r} is not a run directory (no metrics.jsonl, run.yaml, ...)")
        return {**self._summary(run, children, stages), "stages": stages}

    def metrics(self, rel: str, points: int, keys: set[str] | None) -> dict:
        path = self.resolve(rel, file="metrics.jsonl")
        key = (str(path), _stamp(path), points, frozenset(keys) if keys is not None else None)
        # Default-sized answers are kept; a request for many points is rare and may be large.
        keep = points <= DEFAULT_POINTS
        with _readable(rel, "metrics.jsonl"):
            result = self._metrics.get(key, lambda: read_metrics(path, points, keys), keep)
        return {"path": rel, **result}

    def image(self, rel: str) -> tuple[bytes, str]:
        """An image of a run (report.md shows loss.png) and its media type. Only images: the
        page has no use for other files, and a served .html or .svg could carry script. It is
        read whole before the answer starts: a file that fails to open or read gets an error,
        not a 200 cut short."""
        kind = _IMAGES.get(Path(rel).suffix.lower())
        if kind is None:
            raise Refused(415, f"{rel!r} is not an image (.png, .jpg, .gif, .webp)")
        directory, _, name = rel.rpartition("/")
        path = self.resolve(directory or ".", file=name)
        with _readable(directory or ".", name):
            data, cut = registry.read_head(path, MAX_IMAGE)
        if cut:
            raise Refused(413, f"{rel!r} is larger than {MAX_IMAGE >> 20} MiB")
        return data, kind

    def samples(self, rel: str, task: str | None, offset: int, limit: int) -> dict:
        path = self.resolve(rel, file="samples.jsonl")
        with _readable(rel, "samples.jsonl"):
            page = read_samples(path, task, offset, limit)
        return {"path": rel, "task": task, **page}

    def compare(self, rels: list[str]) -> dict:
        if len(rels) < 2:
            raise Refused(400, "give two or more runs to compare (?path=A&path=B)")
        runs = [self.resolve(rel) for rel in rels]
        diff = registry.diff_configs([self.registry_info(run) for run in runs])
        summaries = []
        for run in runs:
            children = self._children(run)
            stages = [self.stage(n, d) for n, d in self._stages(run, children)]
            summaries.append(self._summary(run, children, stages))
        return {"runs": summaries, "diff": _clean([[k, v] for k, v in diff.items()])}


@contextmanager
def _readable(rel: str, name: str) -> Iterator[None]:
    """A file that is there but cannot be opened (permissions, an I/O error): a clear 422."""
    try:
        yield
    except OSError as e:
        raise Refused(422, f"cannot read {name} in {rel!r}: {_reason(e)}") from None


def _names(directory: Path) -> set[str]:
    """The entries of a directory; none when it cannot be listed. What a stage holds is told
    by these names, never by looking at each file: in a folder that may be listed but not
    entered that fails, and the files are then shown as unreadable, with the reason."""
    try:
        return set(os.listdir(directory))
    except OSError:
        return set()


def _kind(names: set[str]) -> str:
    """The kind of a stage directory whose entries are `names`."""
    return next((k for m, k in _KINDS if m in names), "files")


def _modified(directory: Path) -> float:
    try:
        return max((f.stat().st_mtime for f in directory.iterdir()), default=0.0)
    except OSError:
        return 0.0


def _headline(info: dict, parts: list[tuple[str, dict]], evals: list[dict]) -> list:
    """The numbers a run is judged by: final losses, tokens, evaluation scores, the SFT and
    alignment results; labels name the stage they come from when it is not the run itself."""
    m = info["metrics"]
    out: dict[str, Any] = {}
    for label, keys in (
        ("val_loss", ("val_loss", "summary.final_val_loss")),
        ("loss", ("loss",)),
        ("tokens", ("tokens", "summary.tokens_seen")),
    ):
        value = next((m[k] for k in keys if _number(m.get(k))), None)
        if value is not None:
            out[label] = value
    for name, part in [("", info), *parts]:
        pm = part["metrics"]
        prefix = f"{name} " if name else ""
        if _number(pm.get("sft.exact_match_after")):
            out[f"{prefix}exact_match"] = pm["sft.exact_match_after"]
        if part is not info and _number(pm.get("reward_accuracy")):
            out[f"{prefix}reward_accuracy"] = pm["reward_accuracy"]
    for stage in evals:
        for row in stage["eval"]:
            for metric in row["metrics"]:
                if len(out) < 16:
                    out[f"{row['task']} {metric['name']}"] = metric["value"]
    return [[k, v] for k, v in out.items()]


# ---------------------------------------------------------------------------------------------
# The app and the command


class _StrictJSON(JSONResponse):
    """Strict JSON (no NaN tokens, which a browser cannot parse); dates from YAML and the like
    as text."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=False, allow_nan=False, default=str, separators=(",", ":")
        ).encode()


def create_runs_app(root: str | Path, api_key: str | None = None) -> FastAPI:
    """The runs browser's FastAPI app: the page at `/`, JSON under `/api/`."""
    runs = RunsDir(root)
    key = api_key or None
    app = FastAPI(
        title="lmforge runs",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        default_response_class=_StrictJSON,
    )

    def error(status: int, message: str) -> JSONResponse:
        return _StrictJSON({"error": message}, status_code=status)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        # Before routing and validation: without the key nothing about the API is revealed.
        path = request.scope["path"]
        if key is not None and (path == "/api" or path.startswith("/api/")):
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), key.encode()):
                return error(401, "incorrect or missing API key (send Authorization: Bearer KEY)")
        return await call_next(request)

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return error(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        return error(400, f"{first.get('loc', ('', '?'))[-1]}: {first.get('msg')}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error(e.status_code, str(e.detail))

    # Plain `def` endpoints: FastAPI runs them in its thread pool, so a long file read does not
    # hold up other requests.
    @app.get("/api/runs")
    def list_runs():
        return runs.list_runs()

    @app.get("/api/run")
    def run(path: str = "."):
        return runs.run(path)

    @app.get("/api/metrics")
    def metrics(
        path: str = ".",
        points: int = Query(DEFAULT_POINTS, ge=10, le=MAX_POINTS),
        keys: str = Query("", description="comma-separated keys to compute (default: all)"),
    ):
        wanted = {k for k in keys.split(",") if k} or None
        return runs.metrics(path, points, wanted)

    @app.get("/api/samples")
    def samples(
        path: str = ".",
        task: str | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(10, ge=1, le=100),
    ):
        return runs.samples(path, task, offset, limit)

    @app.get("/api/file")
    def file(path: str):
        data, kind = runs.image(path)
        return Response(data, media_type=kind, headers={"Cache-Control": "no-store"})

    @app.get("/api/compare")
    def compare(path: Annotated[list[str] | None, Query()] = None):
        return runs.compare(path or [])

    add_static(app, "runs.html", local_only=api_key is None)
    return app


@dataclass
class UIConfig:
    """Browse runs in a web page: list them with their headline numbers, open one's curves,
    evaluations, data statistics and config, compare several on one plot. Reads files only."""

    runs: str = field_("runs", "folder of run directories (or a single run)")
    host: str = field_("127.0.0.1", "address to listen on (beyond localhost needs --api-key)")
    port: int = field_(8001, "TCP port", ge=1, le=65535)
    api_key: str = field_("", "require 'Authorization: Bearer KEY' (default: $LMFORGE_API_KEY)")

    # `lmforge ui runs/`: the positional argument is the runs folder.
    POSITIONAL = "runs"


def ui_command(config: UIConfig) -> None:
    """Serve the runs browser until interrupted. Listening beyond this machine needs an API key:
    run directories hold configs, data statistics and samples of the training data."""
    import uvicorn

    from lmforge.infer.server import LOCAL_HOSTS

    api_key = config.api_key or os.environ.get("LMFORGE_API_KEY") or None
    if config.host not in LOCAL_HOSTS and not api_key:
        raise LmforgeError(
            f"refusing to listen on {config.host} without an API key: pass --api-key (or use "
            "--host 127.0.0.1 for this machine only)"
        )
    if not Path(config.runs).is_dir():
        raise ConfigError(
            f"runs: {config.runs} is not a directory; give the folder your runs are in "
            "(lmforge ui RUNS_DIR)"
        )
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"browsing runs in {config.runs} on http://{host}:{config.port}/", flush=True)
    uvicorn.run(
        create_runs_app(config.runs, api_key),
        host=config.host,
        port=config.port,
        log_level="warning",
    )
