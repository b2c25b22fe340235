"""`lmforge data process CONFIG.yaml`: ordered cleaning steps over corpus documents, streamed shard
by shard, with statistics, rejects, task i of N partitioning and resume (seed 002 §4.1.2-4.1.3).

Each input file is a shard. Per-document steps (filters, redaction) stream; corpus-level steps
(de-duplication, mixture) split the run into phases: phase k streams every shard through its
steps while collecting the next corpus-level step's keys; once every shard has finished phase k,
that step decides (from the keys of all shards) and phase k+1 applies its decision. A shard's
phase output is written to a temporary file and renamed, its statistics last: a killed run
resumes at the first shard without statistics and produces the same output. Task i of N takes
the shards j with j % N == i; any task may take a decision once all keys exist.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from lmforge.config import field_, to_dict
from lmforge.errors import ConfigError, CorpusError


def _registry() -> dict[str, tuple[Callable[..., Any], str]]:
    """Step name -> (class, doc). Corpus-level steps have `collector`, `decide` and `apply`."""
    from lmforge.data.decontaminate import Decontaminator
    from lmforge.data.dedup import ExactDedup, LineDedup, MinHashDedup
    from lmforge.data.filters import (
        Blocklist,
        C4Filter,
        FineWebFilter,
        GopherQuality,
        GopherRepetition,
    )
    from lmforge.data.langid import LanguageFilter
    from lmforge.data.mixture import Mixture
    from lmforge.data.pii import PIIRedactor
    from lmforge.data.quality_model import ClassifierFilter, PerplexityFilter

    return {
        "language": (LanguageFilter, "fastText language ID; keep listed languages"),
        "gopher_quality": (GopherQuality, "Gopher quality rules (Rae et al. 2021)"),
        "gopher_repetition": (GopherRepetition, "Gopher repetition rules"),
        "c4": (C4Filter, "C4 line and document rules"),
        "fineweb": (FineWebFilter, "FineWeb line rules"),
        "blocklist": (Blocklist, "drop documents with blocklisted words"),
        "perplexity": (PerplexityFilter, "n-gram LM perplexity band"),
        "classifier": (ClassifierFilter, "hashed n-gram logistic-regression quality score"),
        "pii": (PIIRedactor, "redact personal data with typed placeholders"),
        "decontaminate": (Decontaminator, "remove n-gram overlap with evaluation tasks"),
        "exact_dedup": (ExactDedup, "drop exact duplicates (normalised hash)"),
        "line_dedup": (LineDedup, "keep one copy of repeated lines / sentence spans"),
        "minhash_dedup": (MinHashDedup, "drop near-duplicates (MinHash-LSH)"),
        "mixture": (Mixture, "resample sources to target proportions"),
    }


@dataclass
class PipelineConfig:
    """A corpus pipeline: inputs, ordered steps (`- name: {params}`), output shards and stats."""

    input: list[str] = field_([], "text/JSONL/Parquet files, folders or globs (one shard each)")
    hf_dataset: str = field_("", "a Hugging Face dataset name to stream (needs `datasets`)")
    hf_split: str = field_("train", "split of hf_dataset")
    text_key: str = field_("text", "field holding the text in JSONL/Parquet records")
    output: str = field_("", "output directory (data/, rejects/, stats.json, stats.md)")
    format: Literal["jsonl", "parquet"] = field_("jsonl", "format of the output shards")
    steps: list[Any] = field_([], "ordered steps: a name or {name: {parameter: value}}")
    on_bad_record: Literal["skip", "stop"] = field_(
        "skip", "malformed JSONL lines / records: count and skip them, or stop with an error"
    )
    max_chars: int = field_(0, "reject documents longer than this before any step (0: no limit)")
    text_max_chars: int = field_(
        1_000_000,
        "a .txt/.md file longer than this (characters) is read as several documents, cut at "
        "blank lines",
        ge=1,
    )
    rejects: bool = field_(True, "write removed documents with step and reason to rejects/")
    examples: int = field_(3, "removed examples kept per step in the stats", ge=0)
    workers: int = field_(1, "parallel worker processes over shards", ge=1)
    task: int = field_(0, "this task's index (task i of N: shards j with j % tasks == i)", ge=0)
    tasks: int = field_(1, "number of tasks sharing the input shards", ge=1)
    overwrite: bool = field_(False, "replace an existing output directory instead of resuming")

    def validate(self) -> None:
        if self.task >= self.tasks:
            raise ConfigError(f"task: must be < tasks ({self.tasks}), got {self.task}")
        if not self.output:
            raise ConfigError("output: give an output directory")
        if not self.input and not self.hf_dataset:
            raise ConfigError("input: give input files, folders or globs (or hf_dataset)")


def build_steps(specs: list[Any]) -> list[tuple[str, Any]]:
    """(name, step object) for each step spec; unknown names and parameters name the step and
    the closest valid name."""
    registry = _registry()
    steps = []
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            name, params = spec, {}
        elif isinstance(spec, dict) and len(spec) == 1:
            name, params = next(iter(spec.items()))
            params = params or {}
        else:
            raise ConfigError(
                f"steps[{i}]: expected a step name or {{name: {{params}}}}, got {spec!r}"
            )
        if name not in registry:
            close = difflib.get_close_matches(str(name), registry, n=1, cutoff=0.5)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else f"; valid steps: {', '.join(registry)}"
            )
            raise ConfigError(f"steps[{i}]: unknown step {name!r}{hint}")
        if not isinstance(params, dict):
            raise ConfigError(f"steps[{i}] ({name}): parameters must be a mapping, got {params!r}")
        cls = registry[name][0]
        valid = [p for p in inspect.signature(cls).parameters if p != "self"]
        for key in params:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(valid)}"
                raise ConfigError(f"steps[{i}] ({name}): unknown parameter {key!r}{hint}")
        try:
            steps.append((f"{i}:{name}", cls(**params)))
        except (ValueError, TypeError, OSError) as e:
            raise ConfigError(f"steps[{i}] ({name}): {e}") from None
    return steps


def _is_global(step: Any) -> bool:
    return hasattr(step, "decide")


def _phases(steps: list[tuple[str, Any]]) -> list[dict]:
    """Split at corpus-level steps: each phase = (apply `before`, doc steps, collect `after`)."""
    phases, current = [], {"before": None, "steps": [], "after": None}
    for name, step in steps:
        if _is_global(step):
            current["after"] = (name, step)
            phases.append(current)
            current = {"before": (name, step), "steps": [], "after": None}
        else:
            current["steps"].append((name, step))
    phases.append(current)
    return phases


def _shards(config: PipelineConfig) -> list[str]:
    from lmforge.data.sources import resolve_files

    shards = [str(p) for p in resolve_files(config.input)] if config.input else []
    return shards + ([f"hf:{config.hf_dataset}"] if config.hf_dataset else [])


def _read_shard(shard: str, config: PipelineConfig, counts: Counter) -> Iterator[dict]:
    from lmforge.data.sources import iter_documents

    if shard.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise ConfigError(
                "hf_dataset needs the `datasets` package: pip install datasets"
            ) from None
        ds = datasets.load_dataset(shard[3:], split=config.hf_split, streaming=True)
        for i, row in enumerate(ds):
            text = row.get(config.text_key)
            if not isinstance(text, str):
                raise CorpusError(f"{shard} row {i}: no string field {config.text_key!r}")
            yield {"text": text, "id": row.get("id", f"{shard}:{i}"), "source": shard, "meta": {}}
        return
    stats: dict = {}
    skip = config.on_bad_record == "skip"
    try:
        yield from iter_documents(
            shard,
            text_key=config.text_key,
            skip_bad=skip,
            stats=stats,
            text_max_chars=config.text_max_chars,
        )
    except CorpusError as e:
        if stats.get("documents") != 0 or "is empty" not in str(e):
            raise
    counts["bad_records_skipped"] += stats.get("skipped_records", 0)
    counts["bad_files_skipped"] += stats.get("skipped_files", 0)
    counts["text_files_split"] += stats.get("split_text_files", 0)


def _read_jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


class _Writer:
    """Streams documents to a temporary file, renamed into place by `close()`."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt, self.n = path, fmt, 0
        self.tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = self.tmp.open("w", encoding="utf-8") if fmt == "jsonl" else None
        self.rows: list[dict] = []
        self.writer = None

    def write(self, doc: dict) -> None:
        self.n += 1
        if self.f is not None:
            self.f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            return
        self.rows.append({**doc, "id": str(doc.get("id")), "meta": json.dumps(doc["meta"])})
        if len(self.rows) >= 1024:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table.cast(self.writer.schema))
        self.rows = []

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        else:
            self._flush()
            if self.writer is None:
                import pyarrow as pa
                import pyarrow.parquet as pq

                schema = pa.schema([(k, pa.string()) for k in ("text", "id", "source", "meta")])
                pq.write_table(schema.empty_table(), self.tmp)
            else:
                self.writer.close()
        os.replace(self.tmp, self.path)


def _new_step_stats() -> dict:
    return {
        "docs_in": 0,
        "docs_out": 0,
        "chars_in": 0,
        "chars_out": 0,
        "reasons": Counter(),
        "counts": Counter(),
        "examples": [],
    }


class _Runner:
    """Everything one process needs to run shards of one phase."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.out = Path(config.output)
        self.steps = build_steps(config.steps)
        self.phases = _phases(self.steps)
        self.shards = _shards(config)
        self.last = len(self.phases) - 1

    def work(self, phase: int) -> Path:
        return self.out / "work" / f"phase{phase}"

    def done(self, phase: int, shard: int) -> bool:
        return (self.work(phase) / f"{shard:05d}.stats.json").is_file()

    def output_path(self, phase: int, shard: int) -> Path:
        if phase == self.last:
            return self.out / "data" / f"{shard:05d}.{self.config.format}"
        return self.work(phase) / f"{shard:05d}.jsonl"

    def run_shard(self, phase: int, shard: int) -> None:
        config, spec = self.config, self.phases[phase]
        counts: Counter = Counter()
        if phase == 0:
            docs = _read_shard(self.shards[shard], config, counts)
        else:
            docs = _read_jsonl(self.output_path(phase - 1, shard))
        decision = None
        if spec["before"]:
            with np.load(self.work(phase - 1) / f"{shard:05d}.decision.npz") as z:
                decision = dict(z)
        collector = spec["after"][1].collector() if spec["after"] else None
        stats: dict[str, dict] = {}
        names = ([spec["before"][0]] if spec["before"] else []) + [n for n, _ in spec["steps"]]
        for name in names:
            stats[name] = _new_step_stats()
        writer = _Writer(
            self.output_path(phase, shard), config.format if phase == self.last else "jsonl"
        )
        rejects = _Writer(self.out / "rejects" / f"{shard:05d}.phase{phase}.jsonl", "jsonl")
        try:
            for index, doc in enumerate(docs):
                for out in self._process(doc, index, decision, spec, stats, rejects, counts):
                    if collector is not None:
                        collector.add(out)
                    writer.write(out)
        finally:
            writer.close()
            rejects.close()
        if collector is not None:
            np.savez(self.work(phase) / f"{shard:05d}.keys.npz", **collector.result())
        record = {
            "shard": self.shards[shard],
            "docs_out": writer.n,
            "counts": counts,
            "steps": stats,
        }
        tmp = self.work(phase) / f"{shard:05d}.stats.json.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, default=_plain))
        os.replace(tmp, self.work(phase) / f"{shard:05d}.stats.json")

    def _process(self, doc, index, decision, spec, stats, rejects, counts) -> list[dict]:
        config = self.config
        if phase_input_check(doc, config, counts, rejects):
            return []
        current = [doc]
        if spec["before"]:
            name, step = spec["before"]
            st = stats[name]
            st["docs_in"] += 1
            st["chars_in"] += len(doc["text"])
            current, reason = step.apply(doc, index, decision)
            if reason:
                self._reject(doc, name, reason, st, rejects)
            self._count_out(st, current, step)
        for name, step in spec["steps"]:
            st = stats[name]
            kept = []
            for d in current:
                st["docs_in"] += 1
                st["chars_in"] += len(d["text"])
                original = d["text"]
                reason = step(d)
                if reason:
                    self._reject({**d, "text": original}, name, reason, st, rejects)
                else:
                    kept.append(d)
            self._count_out(st, kept, step)
            current = kept
        return current

    @staticmethod
    def _count_out(st: dict, docs: list[dict], step: Any) -> None:
        st["docs_out"] += len(docs)
        for d in docs:
            st["chars_out"] += len(d["text"])
            kind = type(step).__name__
            if kind == "PIIRedactor":
                for pii, n in d["meta"].get("pii", {}).items():
                    st["counts"][f"pii_{pii}"] += n
            elif kind == "LanguageFilter":
                st["counts"][f"language_{d['meta']['language']}"] += 1
            elif kind == "Mixture":  # realised sizes per source, in the unit of the targets
                group = step.group(str(d.get("source", "")))
                st["counts"][f"{step.counted_in}_{group}"] += step.size(d)

    def _reject(self, doc: dict, step: str, reason: str, st: dict, rejects: _Writer) -> None:
        st["reasons"][reason] += 1
        if len(st["examples"]) < self.config.examples:
            st["examples"].append(
                {"id": doc.get("id"), "reason": reason, "text": doc["text"][:200]}
            )
        if self.config.rejects:
            rejects.write({**doc, "step": step, "reason": reason})

    def decide(self, phase: int) -> None:
        """Take the corpus-level decision after `phase` from every shard's keys."""
        name, step = self.phases[phase]["after"]
        collected = []
        for shard in range(len(self.shards)):
            with np.load(self.work(phase) / f"{shard:05d}.keys.npz") as z:
                collected.append(dict(z))
        extra = {}
        if "documents" in inspect.signature(step.decide).parameters:
            # Near-duplicate verification reads the texts again: this phase's output holds them
            # in the order the collector saw them.
            extra = {
                "documents": lambda j: (d["text"] for d in _read_jsonl(self.output_path(phase, j))),
                "scratch": self.work(phase),
            }
        decisions = step.decide(collected, **extra)
        for shard, decision in enumerate(decisions):
            tmp = self.work(phase) / f"{shard:05d}.decision.tmp.npz"
            np.savez(tmp, **decision)
            os.replace(tmp, self.work(phase) / f"{shard:05d}.decision.npz")
        summary = getattr(step, "plan", None) or {}
        if "drop" in decisions[0] and decisions[0]["drop"].dtype == bool:
            summary = {**summary, "units_marked": int(sum(d["drop"].sum() for d in decisions))}
        (self.work(phase) / "decision.json").write_text(json.dumps({name: summary}, default=_plain))

    def decided(self, phase: int) -> bool:
        return (self.work(phase) / "decision.json").is_file()


def phase_input_check(doc: dict, config: PipelineConfig, counts: Counter, rejects: _Writer) -> bool:
    """Reject documents over `max_chars` before any step (a guard against runaway records)."""
    if config.max_chars and len(doc["text"]) > config.max_chars:
        counts["too_long"] += 1
        if config.rejects:
            rejects.write(
                {**doc, "text": doc["text"][:1000], "step": "input", "reason": "too_long"}
            )
        return True
    return False


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


_RUNNER: _Runner | None = None


def _worker_init(config: PipelineConfig) -> None:
    global _RUNNER
    _RUNNER = _Runner(config)


def _worker_run(args: tuple[int, int]) -> None:
    assert _RUNNER is not None
    _RUNNER.run_shard(*args)


def _prepare_output(config: PipelineConfig, runner: _Runner) -> None:
    """Create, resume or (with overwrite) replace the output directory; never touch inputs."""
    out = runner.out.resolve()
    for shard in runner.shards:
        if not shard.startswith("hf:") and out in Path(shard).resolve().parents:
            raise ConfigError(
                f"output {out} contains the input file {shard}: choose another output"
            )
    saved = out / "pipeline.yaml"
    identity = {
        k: v
        for k, v in to_dict(config).items()
        if k not in ("task", "tasks", "workers", "overwrite")
    }
    if out.exists() and any(out.iterdir()):
        if config.overwrite:
            if config.task != 0:
                raise ConfigError("overwrite: only task 0 may clear the output directory")
            shutil.rmtree(out)
        elif not saved.is_file():
            raise ConfigError(f"output {out} exists and is not a pipeline run: pass --overwrite")
        elif yaml.safe_load(saved.read_text(encoding="utf-8")) != identity:
            raise ConfigError(
                f"output {out} holds a run with a different configuration: pass --overwrite "
                "to replace it, or choose another output"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not saved.is_file():
        tmp = saved.with_name("pipeline.yaml.tmp")
        tmp.write_text(
            yaml.safe_dump(identity, sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
        os.replace(tmp, saved)


def process(config: PipelineConfig) -> dict | None:
    """Run this task's shards through every phase it can; returns the merged stats when the whole
    run is finished (None while shards of other tasks are still pending)."""
    runner = _Runner(config)
    _prepare_output(config, runner)
    mine = [j for j in range(len(runner.shards)) if j % config.tasks == config.task]
    pool = None
    if config.workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(config.workers, _worker_init, (config,))
    try:
        for phase in range(len(runner.phases)):
            if phase > 0 and not runner.decided(phase - 1):
                pending = [j for j in range(len(runner.shards)) if not runner.done(phase - 1, j)]
                if pending:
                    print(f"phase {phase} waits for {len(pending)} shard(s) of other tasks; rerun "
                          "this task when they finish")  # fmt: skip
                    return None
                runner.decide(phase - 1)
            todo = [(phase, j) for j in mine if not runner.done(phase, j)]
            if pool is not None:
                pool.map(_worker_run, todo, chunksize=1)
            else:
                for args in todo:
                    runner.run_shard(*args)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    last = runner.last
    if any(not runner.done(last, j) for j in range(len(runner.shards))):
        print(f"task {config.task} of {config.tasks} finished; other tasks' shards are pending")
        return None
    return write_stats(runner)


def write_stats(runner: _Runner) -> dict:
    """Merge per-shard statistics into stats.json and stats.md."""
    steps: dict[str, dict] = {}
    counts: Counter = Counter()
    decisions: dict = {}
    for phase in range(len(runner.phases)):
        if (runner.work(phase) / "decision.json").is_file():
            decisions.update(json.loads((runner.work(phase) / "decision.json").read_text()))
        for shard in range(len(runner.shards)):
            record = json.loads((runner.work(phase) / f"{shard:05d}.stats.json").read_text())
            counts.update(record["counts"])
            for name, st in record["steps"].items():
                total = steps.setdefault(name, _new_step_stats())
                for key in ("docs_in", "docs_out", "chars_in", "chars_out"):
                    total[key] += st[key]
                total["reasons"].update(st["reasons"])
                total["counts"].update(st["counts"])
                room = runner.config.examples - len(total["examples"])
                total["examples"] += st["examples"][:room]
    order = [name for name, _ in runner.steps]
    result = {
        "input_shards": len(runner.shards),
        "input": dict(counts),
        "steps": {name: steps[name] for name in order if name in steps},
        "decisions": decisions,
        "output_documents": _final_docs(runner),
    }
    (runner.out / "stats.json").write_text(
        json.dumps(result, indent=2, default=_plain, ensure_ascii=False)
    )
    (runner.out / "stats.md").write_text(stats_markdown(result), encoding="utf-8")
    return result


def _final_docs(runner: _Runner) -> int:
    return sum(
        json.loads((runner.work(runner.last) / f"{j:05d}.stats.json").read_text())["docs_out"]
        for j in range(len(runner.shards))
    )


def stats_markdown(stats: dict) -> str:
    """A per-step table (documents and characters in and out, removal reasons) plus examples."""
    lines = [
        "# Corpus pipeline statistics",
        "",
        f"{stats['input_shards']} input shard(s); {stats['output_documents']:,} documents out.",
        "",
        "| step | docs in | docs out | chars in | chars out | removed by reason | counts |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, st in stats["steps"].items():
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(st["reasons"].items()))
        counts = ", ".join(f"{k} {v:,}" for k, v in sorted(st["counts"].items()))
        lines.append(
            f"| {name} | {st['docs_in']:,} | {st['docs_out']:,} | {st['chars_in']:,} | "
            f"{st['chars_out']:,} | {reasons} | {counts} |"
        )
    if stats["input"]:
        lines += ["", "Input: " + ", ".join(f"{k} {v:,}" for k, v in stats["input"].items())]
    for name, st in stats["steps"].items():
        if st["examples"]:
            lines += ["", f"## {name}: removed examples", ""]
            for ex in st["examples"]:
                text = ex["text"].replace("\n", " ")[:160]
                lines.append(f"- `{ex['id']}` ({ex['reason']}): {text}")
    return "\n".join(lines) + "\n"


def process_command(config: PipelineConfig) -> None:
    """CLI entry: run, then print where the output and stats are."""
    stats = process(config)
    if stats is not None:
        print(f"{stats['output_documents']:,} documents in {Path(config.output) / 'data'}; "
              f"stats: {Path(config.output) / 'stats.md'}")  # fmt: skip


def clean_documents(docs: list[dict], steps: list[Any], workdir: str | Path) -> tuple[list, dict]:
    """Run `steps` over in-memory documents (via a JSONL file in `workdir`, replaced each call):
    the cleaned documents and the merged stats. `lmforge run` uses this before tokenization."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "input.jsonl"
    with source.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    config = PipelineConfig(
        input=[str(source)], output=str(workdir / "out"), steps=steps, overwrite=True
    )
    stats = process(config)
    assert stats is not None  # one task: always finishes
    cleaned = list(_read_jsonl(workdir / "out" / "data" / "00000.jsonl"))
    return cleaned, stats
