"""Run tasks on a model: build every prompt, batch all requests of a kind together, score each
item, aggregate with standard errors, and write results.json and samples.jsonl.

Every prompt, continuation, generation and extracted answer goes into samples.jsonl so a score
can be traced to the text behind it; results.json carries hashes of the model and the prompts so
two runs can be shown to have evaluated the same thing.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.config import field_
from lmforge.errors import ConfigError
from lmforge.evaluation import lm, metrics
from lmforge.evaluation.tasks import Task, TaskConfig, load_task, render, resolve_task
from lmforge.infer import prompting


@dataclass
class EvalConfig:
    """Evaluate a model on tasks; print a table and write results.json + samples.jsonl."""

    model: str = field_("", "model: lmforge checkpoint, run directory or Hugging Face directory")
    tasks: str = field_(
        "arithmetic,reading_mc,cloze",
        "comma-separated bundled task names, task YAML files or data files (JSONL, BIG-bench "
        "task.json, .txt)",
    )
    shots: int = field_(0, "demonstrations per prompt", ge=0)
    out: str = field_("eval", "directory for results.json and samples.jsonl")
    limit: int = field_(0, "items per task (0: all)", ge=0)
    batch_size: int = field_(16, "requests per forward pass", ge=1)
    padding_side: Literal["right", "left"] = field_("right", "padding for batched scoring")
    seed: int = field_(1234, "seed of the few-shot draw and of sampling")
    cot: Literal["none", "fewshot", "zeroshot"] = field_(
        "none", "chain-of-thought: demonstrations with rationales, or 'Let's think step by step'"
    )
    self_consistency: int = field_(
        1, "sampled rationales per item, majority vote (1: greedy)", ge=1
    )
    temperature: float = field_(0.7, "sampling temperature for self-consistency", gt=0)
    chat: bool = field_(False, "wrap prompts in the tokenizer's chat template")
    overflow: Literal["truncate", "error"] = field_(
        "truncate", "a context longer than the model's window: cut from the left, or fail"
    )
    window: int = field_(0, "perplexity window in tokens (0: the model's max_seq_len)", ge=0)
    stride: int = field_(0, "perplexity stride in tokens (0: the window, no overlap)", ge=0)
    device: str = field_("cpu", "torch device")


def model_sha256(model: torch.nn.Module) -> str:
    """Fingerprint of the weights (names, shapes, dtypes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class _Item:
    task: Task
    index: int
    doc: dict
    prompt: str
    record: dict


def _demos(task: Task, index: int, config: EvalConfig) -> list[tuple[str, str]]:
    if config.shots == 0 or task.output_type == "loglikelihood_rolling":
        return []
    tc = task.config
    pool = prompting.sample_fewshot(
        task.fewshot_docs,
        config.shots,
        seed=config.seed,
        key=f"{tc.name}:{index}",
        exclude=index if task.fewshot_is_eval else None,
        task=f"task {tc.name}",
    )
    cot = config.cot == "fewshot" and task.output_type == "generate_until"
    out = []
    for doc in pool:
        target = tc.cot_target if cot else tc.doc_to_target
        out.append((render(tc.doc_to_text, doc, doc["_where"]), render(target, doc, doc["_where"])))
    return out


def _build(task: Task, index: int, doc: dict, config: EvalConfig, tokenizer) -> _Item:
    tc = task.config
    fmt = prompting.PromptFormat(tc.description, tc.target_delimiter, tc.fewshot_delimiter)
    query = render(tc.doc_to_text, doc, doc["_where"])
    if config.cot == "zeroshot" and task.output_type == "generate_until":
        query = prompting.zero_shot_cot(query, fmt)
    demos = _demos(task, index, config)
    if config.chat:
        prompt = prompting.chat_prompt(tokenizer, query, demos, fmt)
    else:
        prompt = prompting.build_prompt(query, demos, fmt)
    doc_id = doc.get("id", index)
    record = {"task": tc.name, "index": index, "doc_id": doc_id, "prompt": prompt}
    return _Item(task, index, doc, prompt, record)


def _extract(rule: str, text: str) -> str:
    if rule == "none":
        return text.strip()
    if rule == "strict":
        return metrics.extract_strict(text)
    if rule == "flexible":
        return metrics.extract_flexible(text)
    return metrics.extract_answer(text, rule.removeprefix("regex:"))


def _run_multiple_choice(items: list[_Item], model, tokenizer, config, overflow) -> None:
    pairs, tags, owners = [], [], []
    for it in items:
        tc = it.task.config
        choices = tc.choice_labels or it.doc["choices"]
        if tc.choice_labels and len(tc.choice_labels) != len(it.doc["choices"]):
            raise ConfigError(
                f"{it.doc['_where']}: {len(it.doc['choices'])} choices but "
                f"{len(tc.choice_labels)} choice_labels"
            )
        it.record["continuations"] = [tc.target_delimiter + str(c) for c in choices]
        it.record["choices"] = [str(c) for c in choices]
        for cont in it.record["continuations"]:
            pairs.append((it.prompt, cont))
            tags.append(it.doc["_where"])
            owners.append(it)
    scored = lm.loglikelihood(
        model,
        tokenizer,
        pairs,
        batch_size=config.batch_size,
        padding_side=config.padding_side,
        overflow=overflow,
        tags=tags,
    )
    for it in items:
        it.record["logliks"], it.record["is_greedy"] = [], []
    for it, r in zip(owners, scored, strict=True):
        it.record["logliks"].append(r.logprob)
        it.record["is_greedy"].append(r.is_greedy)
    for it in items:
        gold = it.doc["gold"]
        lls = it.record["logliks"]
        it.record["gold"] = gold
        scores = metrics.multiple_choice_scores(lls, it.record["choices"], gold)
        it.record.update(pred=scores.pop("pred"), pred_norm=scores.pop("pred_norm"), scores=scores)


def _run_cloze(items: list[_Item], model, tokenizer, config, overflow) -> None:
    pairs = []
    for it in items:
        tc = it.task.config
        target = render(tc.doc_to_target, it.doc, it.doc["_where"])
        it.record["continuation"] = tc.target_delimiter + target
        pairs.append((it.prompt, it.record["continuation"]))
    scored = lm.loglikelihood(
        model,
        tokenizer,
        pairs,
        batch_size=config.batch_size,
        padding_side=config.padding_side,
        overflow=overflow,
        tags=[it.doc["_where"] for it in items],
    )
    for it, r in zip(items, scored, strict=True):
        it.record.update(loglik=r.logprob, is_greedy=r.is_greedy, n_tokens=r.n_tokens)
        it.record["scores"] = {"acc": float(r.is_greedy), "perplexity": r.logprob}


def _run_rolling(items: list[_Item], model, tokenizer, config) -> None:
    texts = [it.prompt for it in items]
    scored = lm.loglikelihood_rolling(
        model,
        tokenizer,
        texts,
        window=config.window or None,
        stride=config.stride or None,
        batch_size=config.batch_size,
        padding_side=config.padding_side,
        tags=[it.doc["_where"] for it in items],
    )
    for it, r in zip(items, scored, strict=True):
        it.record.update(
            loglik=r.logprob, n_tokens=r.n_tokens, n_words=r.n_words, n_bytes=r.n_bytes
        )
        it.record["scores"] = {}


def _run_generation(items: list[_Item], model, tokenizer, config, overflow) -> None:
    n = config.self_consistency
    by_params: dict[tuple, list[_Item]] = {}
    for it in items:
        tc = it.task.config
        by_params.setdefault((tuple(tc.until), tc.max_gen_toks), []).append(it)
    for (until, max_gen_toks), group in by_params.items():
        prompts = [it.prompt for it in group for _ in range(n)]
        texts = lm.generate_until(
            model,
            tokenizer,
            prompts,
            until=until,
            max_gen_toks=max_gen_toks,
            temperature=0.0 if n == 1 else config.temperature,
            seed=config.seed,
            batch_size=config.batch_size,
            overflow=overflow,
            tags=[it.doc["_where"] for it in group for _ in range(n)],
        )
        for k, it in enumerate(group):
            it.record["generations"] = texts[k * n : (k + 1) * n]
    for it in items:
        tc = it.task.config
        norm = metrics.Normalization.from_dict(tc.normalization)
        targets = it.doc.get("targets") or [render(tc.doc_to_target, it.doc, it.doc["_where"])]
        it.record["target"] = targets if len(targets) > 1 else targets[0]
        extracted, scores = {}, {}
        for rule in tc.extract:
            answers = [_extract(rule, g) for g in it.record["generations"]]
            answer = prompting.majority_vote(answers) if n > 1 else answers[0]
            extracted[rule] = answer if n == 1 else {"votes": answers, "answer": answer}
            suffix = "" if len(tc.extract) == 1 else f",{rule}"
            if "exact_match" in tc.metrics:
                scores[f"exact_match{suffix}"] = metrics.exact_match(answer, targets, norm)
            if "f1" in tc.metrics:
                scores[f"f1{suffix}"] = metrics.token_f1(answer, targets)
        it.record.update(extracted=extracted, scores=scores)


def _aggregate(task: Task, records: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(records), "output_type": task.output_type}
    if task.output_type == "loglikelihood_rolling":
        cols = [[r[k] for r in records] for k in ("loglik", "n_tokens", "n_words", "n_bytes")]
        values = metrics.perplexity_aggregates(*cols)
        for name in task.config.metrics:
            out[name] = values[name]
            out[f"{name}_stderr"] = metrics.bootstrap_stderr(
                lambda *c, name=name: metrics.perplexity_aggregates(*c)[name], cols
            )
        return out
    names = sorted({k for r in records for k in r["scores"]}, key=list(records[0]["scores"]).index)
    for name in names:
        values = [r["scores"][name] for r in records]
        if name == "perplexity":  # lm-eval's perplexity aggregate: exp(-mean log-likelihood)
            out[name] = math.exp(-metrics.mean(values))
            out[f"{name}_stderr"] = metrics.bootstrap_stderr(
                lambda v: math.exp(-v.mean()), [values]
            )
        else:
            out[name] = metrics.mean(values)
            out[f"{name}_stderr"] = metrics.mean_stderr(values)
    return out


def evaluate(model, tokenizer, task_configs: list[TaskConfig], config: EvalConfig) -> dict:
    """Evaluate; returns {"results", "samples", "warnings", "prompts_sha256", "tasks"}."""
    tasks = []
    for tc in task_configs:
        if config.limit:
            tc.limit = config.limit
        tasks.append(load_task(tc))
    overflow = lm.Overflow(config.overflow)
    items = [_build(t, i, d, config, tokenizer) for t in tasks for i, d in enumerate(t.docs)]
    by_type: dict[str, list[_Item]] = {}
    for it in items:
        by_type.setdefault(it.task.output_type, []).append(it)
    model.eval()
    if "multiple_choice" in by_type:
        _run_multiple_choice(by_type["multiple_choice"], model, tokenizer, config, overflow)
    if "loglikelihood" in by_type:
        _run_cloze(by_type["loglikelihood"], model, tokenizer, config, overflow)
    if "loglikelihood_rolling" in by_type:
        _run_rolling(by_type["loglikelihood_rolling"], model, tokenizer, config)
    if "generate_until" in by_type:
        _run_generation(by_type["generate_until"], model, tokenizer, config, overflow)
    results, hashes = {}, {}
    for t in tasks:
        records = [it.record for it in items if it.task is t]
        results[t.name] = _aggregate(t, records)
        hashes[t.name] = hashlib.sha256(
            "\x00".join(r["prompt"] for r in records).encode()
        ).hexdigest()
    task_meta = {}
    for t in tasks:
        meta = {k: v for k, v in asdict(t.config).items() if k != "metadata"}
        task_meta[t.name] = {**meta, "metadata": t.config.metadata}
    return {
        "results": results,
        "samples": [it.record for it in items],
        "warnings": overflow.warnings,
        "prompts_sha256": hashes,
        "tasks": task_meta,
    }


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'task':<20} {'metric':<24} {'value':>10} {'stderr':>10} {'n':>6}"]
    for task, res in results.items():
        for key, value in res.items():
            if key in ("n", "output_type") or key.endswith("_stderr"):
                continue
            err = res.get(f"{key}_stderr", float("nan"))
            lines.append(f"{task:<20} {key:<24} {value:>10.4f} {err:>10.4f} {res['n']:>6}")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(out_dir: str | Path, evaluation: dict, extra: dict) -> Path:
    """results.json (metrics, config, hashes) and samples.jsonl (one line per item)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for record in evaluation["samples"]:
            f.write(json.dumps(_json_safe(record), ensure_ascii=False) + "\n")
    all_prompts = hashlib.sha256(
        "".join(
            evaluation["prompts_sha256"][k] for k in sorted(evaluation["prompts_sha256"])
        ).encode()
    ).hexdigest()
    body = {
        "results": evaluation["results"],
        **extra,
        "prompts_sha256": {"all": all_prompts, **evaluation["prompts_sha256"]},
        "tasks": evaluation["tasks"],
        "warnings": evaluation["warnings"],
    }
    path = out / "results.json"
    path.write_text(
        json.dumps(_json_safe(body), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return path


def eval_command(config: EvalConfig) -> dict:
    """`lmforge eval`: load the model, run the tasks, print the table, write the files."""
    import lmforge

    if not config.model:
        raise ConfigError("model: give a model directory (--model=PATH)")
    names = [t.strip() for t in config.tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError("tasks: give at least one task (--tasks=name1,name2)")
    task_configs = [resolve_task(n) for n in names]
    model = lmforge.load(config.model, device=config.device)
    tokenizer = lmforge.load_tokenizer(config.model)
    start = time.perf_counter()
    evaluation = evaluate(model, tokenizer, task_configs, config)
    seconds = time.perf_counter() - start
    warnings = evaluation["warnings"]
    for w in warnings[:3]:
        print(f"warning: {w}", file=sys.stderr)
    if len(warnings) > 3:
        print(f"warning: ... {len(warnings) - 3} more in results.json", file=sys.stderr)
    print(format_table(evaluation["results"]))
    extra = {
        "config": asdict(config),
        "model": {"path": str(config.model), "sha256": model_sha256(model)},
        "seconds": round(seconds, 3),
        "lmforge_version": lmforge.__version__,
    }
    path = write_outputs(config.out, evaluation, extra)
    print(f"results: {path}\nsamples: {path.parent / 'samples.jsonl'}")
    return evaluation["results"]
