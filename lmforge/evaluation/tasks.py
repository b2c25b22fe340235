"""Task definitions (YAML) and loaders for the formats the field uses.

A task is a TaskConfig (prompt templates, few-shot source, metrics, stop strings, in the shape of
an lm-evaluation-harness YAML) plus a list of documents from one of:
- "jsonl": one JSON object a line. multiple_choice needs question, choices (>= 2) and answer
  (index, letter or choice text), as MMLU/ARC/HellaSwag exports; generate_until needs question and
  answer (a GSM8K answer "rationale\\n#### N" is split into rationale and answer); loglikelihood
  (cloze) needs question and answer; loglikelihood_rolling needs text.
- "bigbench": a BIG-bench task.json (target_scores -> multiple choice, target -> generative), with
  its task_prefix, example_input_prefix, example_output_prefix, choice_prefix and
  append_choices_to_input fields honoured as BIG-bench's json_task.py applies them.
- "text": a plain text file, one document per blank-line-separated paragraph, for perplexity.
- "synthetic": rule-generated items from lmforge.data.synthetic ("synthetic:arithmetic").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from jinja2 import Environment, StrictUndefined, TemplateError

from lmforge.config import from_dict
from lmforge.errors import ConfigError, LmforgeError
from lmforge.evaluation.metrics import Normalization

OutputType = Literal["multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling"]
TASK_DIR = Path(__file__).resolve().parent.parent / "recipes" / "tasks"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
_JINJA = Environment(undefined=StrictUndefined, keep_trailing_newline=True)


class TaskError(LmforgeError):
    """A task definition or data file that cannot be used, named with the task and item."""


@dataclass
class TaskConfig:
    """One evaluation task: where its items come from and how each becomes a prompt and a score."""

    name: str = ""
    data: str = ""  # a file path, "bundled:FILE" or "synthetic:TASK"
    format: Literal["auto", "jsonl", "bigbench", "text", "synthetic"] = "auto"
    output_type: OutputType | None = None  # None: decided by the format and the data
    fewshot_data: str = ""  # default: the same items, never the one being evaluated
    description: str = ""
    doc_to_text: str = ""  # Jinja template over the item's fields (or a field name)
    doc_to_target: str = ""
    cot_target: str = "{{solution}}"  # demonstration target in chain-of-thought mode
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    choice_labels: list[str] = field(default_factory=list)  # score "A".."D" instead of the texts
    metrics: list[str] = field(default_factory=list)
    extract: list[str] = field(default_factory=list)  # none | strict | flexible | regex:PATTERN
    normalization: dict[str, Any] = field(default_factory=dict)
    until: list[str] = field(default_factory=list)
    max_gen_toks: int = 128
    limit: int = 0  # 0: every item
    synthetic_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    config: TaskConfig
    docs: list[dict]
    fewshot_docs: list[dict]
    fewshot_is_eval: bool  # demonstrations come from the evaluated items (skip the item itself)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def output_type(self) -> OutputType:
        return self.config.output_type  # type: ignore[return-value]


def render(template: str, doc: dict, where: str) -> str:
    """A template rendered on an item; a bare field name returns that field."""
    if template in doc and not isinstance(doc[template], (list, dict)):
        return str(doc[template])
    try:
        return _JINJA.from_string(template).render(**doc)
    except TemplateError as e:
        raise TaskError(f"{where}: template {template!r} failed: {e}") from None


def _read_jsonl(path: Path, task: str) -> list[dict]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"task {task}: {path} line {n} is not JSON: {e.msg}") from None
        if not isinstance(doc, dict):
            raise TaskError(f"task {task}: {path} line {n} is not a JSON object")
        doc.setdefault("_where", f"task {task}: {path.name} line {n}")
        docs.append(doc)
    if not docs:
        raise TaskError(f"task {task}: {path} holds no items")
    return docs


def _need(doc: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in doc]
    if missing:
        raise TaskError(f"{doc['_where']}: missing field(s) {', '.join(missing)} ({what})")


def _gold_index(doc: dict) -> int:
    answer, choices = doc["answer"], doc["choices"]
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise TaskError(f"{doc['_where']}: answer must be an index, a letter or a choice text")
    if isinstance(answer, int):
        index = answer
    elif answer in choices:
        index = choices.index(answer)
    elif len(answer) == 1 and answer.isalpha():
        index = ord(answer.upper()) - ord("A")
    elif answer.strip().isdigit():
        index = int(answer)
    else:
        raise TaskError(f"{doc['_where']}: answer {answer!r} is not an index, letter or choice")
    if not 0 <= index < len(choices):
        raise TaskError(
            f"{doc['_where']}: answer {answer!r} is out of range for {len(choices)} choices"
        )
    return index


def _prepare_jsonl(docs: list[dict], output_type: str) -> None:
    for doc in docs:
        if output_type == "multiple_choice":
            _need(doc, ("question", "choices", "answer"), "multiple choice")
            if not isinstance(doc["choices"], list) or len(doc["choices"]) < 2:
                raise TaskError(f"{doc['_where']}: a multiple-choice item needs at least 2 choices")
            doc["gold"] = [_gold_index(doc)]
        elif output_type == "loglikelihood_rolling":
            _need(doc, ("text",), "perplexity")
        else:
            _need(doc, ("question", "answer"), output_type)
            answer = str(doc["answer"])
            if "####" in answer:  # GSM8K: "rationale\n#### 72"
                rationale, short = answer.rsplit("####", 1)
                doc.setdefault("rationale", rationale.strip())
                doc["answer"] = short.strip().replace(",", "")
            doc["answer"] = str(doc["answer"])
            if "rationale" in doc:
                doc.setdefault("solution", f"{doc['rationale']}\n#### {doc['answer']}")


# BIG-bench json_task.py defaults for the formatting fields.
BIGBENCH_DEFAULTS = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
    "few_shot_example_separator": "\n",
}


def load_bigbench(path: Path, config: TaskConfig) -> list[dict]:
    """Items of a BIG-bench task.json, each with its formatted `input`, and `choices` + `gold`
    (target_scores) or `targets` (generative). Choices appended to the input are permuted by a
    seeded generator as BIG-bench does, so the prompt is fixed for a given file."""
    name = config.name
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskError(f"task {name}: {path} is not JSON: {e.msg}") from None
    if "examples" not in spec or not spec["examples"]:
        raise TaskError(f"task {name}: {path} has no 'examples' (is it a BIG-bench task.json?)")
    opts = {k: spec.get(k, v) for k, v in BIGBENCH_DEFAULTS.items()}
    mc = all("target_scores" in ex for ex in spec["examples"])
    config.output_type = config.output_type or ("multiple_choice" if mc else "generate_until")
    config.description = config.description or opts["task_prefix"]
    config.fewshot_delimiter = opts["few_shot_example_separator"]
    config.target_delimiter = ""
    config.doc_to_text = config.doc_to_text or "{{input}}"
    config.doc_to_target = config.doc_to_target or "{{targets[0]}}"
    config.until = config.until or [spec.get("stop_string", "\n")]
    config.metadata = {"bigbench_name": spec.get("name", name), **config.metadata}
    rng = np.random.RandomState(42)
    docs = []
    for n, ex in enumerate(spec["examples"]):
        where = f"task {name}: {path.name} example {n}"
        if "input" not in ex:
            raise TaskError(f"{where}: missing field input")
        text = ex["input"]
        doc: dict[str, Any] = {"_where": where}
        if config.output_type == "multiple_choice":
            scores = ex.get("target_scores")
            if not isinstance(scores, dict) or len(scores) < 2:
                raise TaskError(f"{where}: target_scores needs at least 2 choices")
            choices = list(scores)
            if opts["append_choices_to_input"]:
                shown = rng.permutation(sorted(choices))
                text += opts["choice_prefix"] + opts["choice_prefix"].join(shown)
            best = max(scores.values())
            doc.update(
                choices=choices, gold=[i for i, c in enumerate(choices) if scores[c] == best]
            )
            doc["targets"] = [choices[i] for i in doc["gold"]]
        else:
            if "target" not in ex:
                raise TaskError(f"{where}: missing field target (or target_scores)")
            targets = ex["target"] if isinstance(ex["target"], list) else [ex["target"]]
            doc.update(targets=[str(t) for t in targets], answer=str(targets[0]))
        doc["input"] = opts["example_input_prefix"] + text + opts["example_output_prefix"]
        docs.append(doc)
    return docs


def _resolve(data: str, name: str) -> Path:
    path = (
        BUNDLED_DIR / data.removeprefix("bundled:") if data.startswith("bundled:") else Path(data)
    )
    if not path.exists():
        raise TaskError(f"task {name}: data file {path} does not exist")
    return path


def _guess_format(path: Path) -> str:
    if path.suffix == ".json":
        return "bigbench"
    if path.suffix in (".txt", ".md"):
        return "text"
    return "jsonl"


def _load_docs(config: TaskConfig, data: str, split: str) -> tuple[list[dict], str]:
    """(items, format) for a data reference; fills in the output type where the data decides."""
    from lmforge.data import synthetic

    name = config.name
    if data.startswith("synthetic:"):
        items = synthetic.generate(
            data.removeprefix("synthetic:"),
            config.limit or 50,
            split=split,
            levels=tuple(config.synthetic_levels),
        )
        docs = [{**it.to_dict(), "_where": f"task {name}: item {it.id}"} for it in items]
        config.output_type = config.output_type or "generate_until"
        return docs, "synthetic"
    path = _resolve(data, name)
    fmt = config.format if config.format not in ("auto", "synthetic") else _guess_format(path)
    if fmt == "bigbench":
        return load_bigbench(path, config), fmt
    if fmt == "text":
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
        docs = [
            {"text": p, "_where": f"task {name}: {path.name} paragraph {i}"}
            for i, p in enumerate(paragraphs)
            if p
        ]
        if not docs:
            raise TaskError(f"task {name}: {path} is empty")
        config.output_type = config.output_type or "loglikelihood_rolling"
        return docs, fmt
    docs = _read_jsonl(path, name)
    if config.output_type is None:
        config.output_type = "multiple_choice" if "choices" in docs[0] else "generate_until"
    _prepare_jsonl(docs, config.output_type)
    return docs, fmt


DEFAULT_METRICS = {
    "multiple_choice": ["acc", "acc_norm"],
    "generate_until": ["exact_match"],
    "loglikelihood": ["acc", "perplexity"],
    "loglikelihood_rolling": [
        "token_perplexity",
        "word_perplexity",
        "byte_perplexity",
        "bits_per_byte",
    ],
}
KNOWN_METRICS = {m for ms in DEFAULT_METRICS.values() for m in ms} | {"f1"}


def _check(config: TaskConfig) -> None:
    name = config.name
    for metric in config.metrics:
        if metric not in KNOWN_METRICS:
            raise TaskError(
                f"task {name}: unknown metric {metric!r}; known: {sorted(KNOWN_METRICS)}"
            )
    for rule in config.extract:
        if rule in ("none", "strict", "flexible"):
            continue
        if not rule.startswith("regex:"):
            raise TaskError(
                f"task {name}: extract rule {rule!r} is not none/strict/flexible/regex:PATTERN"
            )
        try:
            re.compile(rule.removeprefix("regex:"))
        except re.error as e:
            raise TaskError(
                f"task {name}: extract regex {rule[6:]!r} does not compile: {e}"
            ) from None
    known = {f.name for f in fields(Normalization)}
    if unknown := set(config.normalization) - known:
        raise TaskError(
            f"task {name}: unknown normalization option(s) {sorted(unknown)}; known: {sorted(known)}"
        )
    for pattern in config.normalization.get("regexes_to_ignore", []):
        try:
            re.compile(pattern)
        except re.error as e:
            raise TaskError(
                f"task {name}: normalization regex {pattern!r} does not compile: {e}"
            ) from None


def load_task(config: TaskConfig) -> Task:
    """Load a task's items and its few-shot pool and fill in the defaults the format implies."""
    if not config.data:
        raise TaskError(f"task {config.name or '?'}: no data given")
    config.name = config.name or Path(config.data.split(":")[-1]).stem
    docs, fmt = _load_docs(config, config.data, "test")
    if fmt != "synthetic" and config.limit:
        docs = docs[: config.limit]
    otype = config.output_type
    defaults = {
        "multiple_choice": ("Question: {{question}}\nAnswer:", "{{choices[gold[0]]}}"),
        "generate_until": ("Question: {{question}}\nAnswer:", "{{answer}}"),
        "loglikelihood": ("{{question}}", "{{answer}}"),
        "loglikelihood_rolling": ("{{text}}", ""),
    }[otype]
    config.doc_to_text = config.doc_to_text or defaults[0]
    config.doc_to_target = config.doc_to_target or defaults[1]
    config.metrics = config.metrics or list(DEFAULT_METRICS[otype])
    if otype == "generate_until":
        config.extract = config.extract or ["none"]
        config.until = config.until or ["\n\n", "Question:"]
    _check(config)
    if config.fewshot_data:
        fewshot, _ = _load_docs(
            TaskConfig(**{**config.__dict__, "limit": 0}), config.fewshot_data, "train"
        )
        same = False
    elif fmt == "synthetic":
        fewshot, _ = _load_docs(
            TaskConfig(**{**config.__dict__, "limit": 64}), config.data, "train"
        )
        same = False
    else:
        fewshot, same = docs, True
    return Task(config, docs, fewshot, same)


def load_task_file(path: str | Path) -> TaskConfig:
    """A TaskConfig from YAML; unknown keys and bad values fail with the field named."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TaskError(f"task file {path}: not valid YAML: {e}") from None
    try:
        config = from_dict(TaskConfig, raw)
    except ConfigError as e:
        raise TaskError(f"task file {path}: {e}") from None
    config.name = config.name or path.stem
    if config.data and not config.data.startswith(("bundled:", "synthetic:")):
        data = Path(config.data)
        if not data.is_absolute() and not data.exists():
            config.data = str(path.parent / data)
    return config


def bundled_tasks() -> dict[str, Path]:
    """Task names shipped with lmforge (lmforge/recipes/tasks/*.yaml)."""
    return {p.stem: p for p in sorted(TASK_DIR.glob("*.yaml"))}


def resolve_task(spec: str) -> TaskConfig:
    """A task from a bundled name, a task YAML, or a data file (JSONL, BIG-bench JSON, text)."""
    bundled = bundled_tasks()
    if spec in bundled:
        return load_task_file(bundled[spec])
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TaskError(f"task file {path} does not exist")
        return load_task_file(path)
    if path.is_dir() and (path / "task.json").is_file():
        path = path / "task.json"
    if path.is_file():
        name = path.parent.name if path.name == "task.json" else path.stem
        return TaskConfig(name=name, data=str(path))
    raise TaskError(
        f"unknown task {spec!r}: not a bundled task ({', '.join(bundled) or 'none'}), "
        "a task YAML or a data file"
    )
