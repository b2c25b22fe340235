"""`lmforge run`: the whole pipeline on a small default, end to end, with a report card.

corpus -> tokenizer -> token shards -> pre-training -> samples -> quantization -> evaluation ->
instruction tuning -> alignment -> report.md, plus a few answers from a released chat model (SmolLM2, GGUF) to show the inference
path on real weights. With no arguments it
uses an English corpus that ships with Python (the pydoc reference topics and the standard
library's docstrings), so it needs no download. Later stages are added here as they land.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.config import field_, save_yaml
from lmforge.model import ModelConfig, Transformer
from lmforge.model.config import round_up
from lmforge.train.trainer import TrainConfig, Trainer


def _demo_model() -> ModelConfig:
    # A small Llama-style model: sized so pre-training fits in ~3 minutes on 2 CPU cores.
    return ModelConfig(
        vocab_size=4096,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=256,
        mlp="swiglu",
        position="rope",
        norm="rmsnorm",
    )


def _demo_train() -> TrainConfig:
    return TrainConfig(
        steps=400,
        batch_size=16,
        seq_len=128,
        lr=3e-3,
        warmup_steps=40,
        eval_every=50,
        eval_batches=16,
        save_every=200,
        log_every=10,
        # A safety net for slower machines: the demo must finish in minutes.
        time_limit_s=210,
    )


@dataclass
class RunConfig:
    """The main job: corpus -> tokenizer -> shards -> pre-train -> samples -> report."""

    data: list[str] = field_(
        [], "your own text/JSONL/Parquet files or folders (default: Python's own documentation)"
    )
    out: str = field_("", "run directory (default: runs/<timestamp>)")
    vocab_size: int = field_(4096, "BPE vocabulary size", ge=257)
    val_fraction: float = field_(0.05, "fraction of documents held out", gt=0, le=0.5)
    skip_bad: bool = field_(False, "skip input files that are not UTF-8")
    clean_steps: list[Any] = field_(
        ["pii", "exact_dedup", "minhash_dedup", {"line_dedup": {"min_chars": 40}}],
        "corpus cleaning before tokenization, as in `lmforge data process` ([] skips); "
        "decontamination against eval_tasks is added when those are set",
    )
    model: ModelConfig = field_(
        _demo_model(), "model architecture (vocab_size follows the tokenizer)"
    )
    train: TrainConfig = field_(_demo_train(), "pre-training settings")
    prompts: list[str] = field_(
        ["The list", "Return a new", "This module provides", "If the"],
        "prompts to sample from after training",
    )
    sample_tokens: int = field_(48, "tokens per sample", ge=1)
    eval_tasks: str = field_(
        "reading_mc,cloze,comparison", "bundled tasks scored after training ('' skips)"
    )
    eval_limit: int = field_(12, "items per evaluation task", ge=1)
    chat_model: str = field_(
        "smollm2", "a released chat model to answer chat_questions in the report ('' skips)"
    )
    chat_questions: list[str] = field_(
        [
            "What is the capital of France?",
            "Give two tips for writing readable Python code.",
            "Translate 'good morning' into Spanish.",
        ],
        "questions put to chat_model, each in a fresh conversation",
    )
    chat_tokens: int = field_(48, "longest answer in tokens", ge=1)
    sft_steps: int = field_(
        300, "instruction-tuning steps on the rule-generated set after evaluation (0 skips)", ge=0
    )
    # A 4M-parameter model trained from scratch learns the task in ~30 s only with all its weights
    # free and answer-only targets (0 -> ~0.33 exact match on comparison); LoRA on it, or
    # rationales, stay at 0 in that budget. On released models LoRA does well (docs/adapt.md).
    sft_method: Literal["full", "lora", "adapter", "prefix", "prompt"] = field_(
        "full", "instruction tuning: full fine-tuning or a parameter-efficient method"
    )
    sft_tasks: list[str] = field_(["comparison"], "rule-generated tasks for instruction tuning")
    sft_rationale: bool = field_(False, "train on step-by-step rationales, not just answers")
    sft_eval_items: int = field_(24, "held-out items per task scored before and after", ge=1)
    sft_time_limit_s: float = field_(30.0, "stop instruction tuning after this long", ge=0)
    align: bool = field_(
        True,
        "after instruction tuning, align the model with DPO on verifiable preference pairs of "
        "sft_tasks (right vs wrong answer, concise vs rambling, refusal vs compliance) and report "
        "reward, KL and exact match before and after",
    )
    align_steps: int = field_(30, "DPO steps of the alignment stage (at most 20 s)", ge=1)
    quantize: bool = field_(
        True,
        "after pre-training, quantize the model (int8 RTN per channel, int4 RTN group-wise) and "
        "report size on disk, decode speed and validation perplexity against fp32",
    )


def _clean(docs: list[dict], config: RunConfig, out: Path) -> tuple[list[dict], dict[str, str]]:
    """The corpus pipeline (seed 002 §4.1.2) before tokenization: cleaned documents and report
    lines (documents and characters per step, PII counts); stats in out/data/."""
    from lmforge.data.pipeline import clean_documents

    t = _stage("corpus cleaning")
    steps = list(config.clean_steps)
    tasks = [n.strip() for n in config.eval_tasks.split(",") if n.strip()]
    if tasks:
        steps.append({"decontaminate": {"tasks": tasks}})
    cleaned, stats = clean_documents(docs, steps, out / "data")
    lines = {}
    for name, st in stats["steps"].items():
        removed = ", ".join(
            f"{k} {v}" for k, v in sorted({**st["reasons"], **st["counts"]}.items())
        )
        lines[f"cleaning {name} (docs, chars in → out)"] = (
            f"{st['docs_in']:,} → {st['docs_out']:,}, {st['chars_in']:,} → {st['chars_out']:,}"
            + (f"; {removed}" if removed else "")
        )
    print(f"{len(docs):,} → {len(cleaned):,} documents ({time.perf_counter() - t:.1f}s)")
    return cleaned, lines


def _stage(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def _evaluate(model: Transformer, tokenizer, config: RunConfig, out: Path) -> dict[str, str]:
    """Score the bundled tasks (a few dozen items: seconds) and return report lines."""
    from lmforge.evaluation.harness import EvalConfig, evaluate, write_outputs
    from lmforge.evaluation.tasks import resolve_task

    t = _stage("evaluation")
    eval_config = EvalConfig(tasks=config.eval_tasks, limit=config.eval_limit)
    tasks = [resolve_task(n.strip()) for n in config.eval_tasks.split(",") if n.strip()]
    evaluation = evaluate(model, tokenizer, tasks, eval_config)
    write_outputs(out / "eval", evaluation, {"config": eval_config.__dict__})
    lines = {}
    for task, res in evaluation["results"].items():
        for key, value in res.items():
            if isinstance(value, float) and not key.endswith("_stderr"):
                err = res.get(f"{key}_stderr", float("nan"))
                lines[f"eval {task} {key} (n={res['n']})"] = f"{value:.4g} ± {err:.2g}"
    print(f"{len(lines)} scores written to {out / 'eval'} ({time.perf_counter() - t:.1f}s)")
    return lines


def _instruction_tuning(model: Transformer, tokenizer, config: RunConfig, out: Path) -> dict:
    """Instruction-tune the pre-trained model on rule-generated tasks (seed 002 §5.1) and score
    exact match on held-out items before and after: report lines."""
    from lmforge.adapt.sft import SFTConfig, sft

    t = _stage(f"instruction tuning ({config.sft_method})")
    sc = SFTConfig(
        model="the pre-trained demo model",
        out=str(out / "sft"),
        method=config.sft_method,
        synthetic_tasks=list(config.sft_tasks),
        synthetic_per_task=400,
        languages=["en"],  # the demo tokenizer is trained on English text
        rationale=config.sft_rationale,
        eval_items=config.sft_eval_items,
        max_new_tokens=32 if config.sft_rationale else 8,
        packing=config.sft_method != "prompt",
        skip_too_long=True,  # a user's tiny tokenizer may make some outputs too long: count them
        train=TrainConfig(
            steps=config.sft_steps,
            batch_size=16,
            seq_len=64 if not config.sft_rationale else 128,
            warmup_steps=5,
            weight_decay=0.0,
            eval_every=0,
            save_every=0,
            log_every=10,
            seed=config.train.seed,
            device=config.train.device,
            time_limit_s=config.sft_time_limit_s,
            # LoRA and the other small adapters take a larger step than full fine-tuning.
            lr=1e-3 if config.sft_method == "full" else 5e-3,
        ),
    )
    sc.lora.targets, sc.lora.r, sc.lora.alpha = ["all-linear"], 16, 32.0
    result = sft(sc, model=model, tokenizer=tokenizer)
    print(f"({time.perf_counter() - t:.1f}s)")
    n = result["eval_items"]
    return {
        "instruction tuning": f"{result['method']} on {', '.join(config.sft_tasks)}: "
        f"{result['train']['steps']} steps, {result['trainable_parameters']:,} trainable "
        f"parameters, {result['train']['train_seconds']:.0f}s",
        f"instruction tuning exact match before → after (held-out, n={n})": (
            f"{result['exact_match_before']:.3f} → {result['exact_match_after']:.3f}"
        ),
    }


def _alignment(model: Transformer, tokenizer, config: RunConfig, out: Path) -> dict:
    """DPO (Rafailov et al. 2023) of the instruction-tuned model on verifiable preference pairs
    of its tasks (seed 002 §5.2): report lines with verifier reward, exact match, refusal rate
    of held-out harmful requests and KL to the SFT model, before and after."""
    from lmforge.adapt.dpo import DPOConfig, dpo
    from lmforge.adapt.optimize import AlignTrainConfig
    from lmforge.adapt.preference import PreferenceDataConfig

    t = _stage("alignment (DPO)")
    # beta 0.5 and lr 3e-5: at beta 0.1 / lr 1e-4 DPO sharpened held-out preferences but wrecked
    # greedy answers of small models (docs/align.md, "Measured").
    dc = DPOConfig(
        model="the instruction-tuned demo model",
        out=str(out / "align"),
        method="full",
        data=PreferenceDataConfig(
            tasks=list(config.sft_tasks),
            per_task=100,
            eval_per_task=16,
            rationale=config.sft_rationale,
        ),
        beta=0.5,
        eval_items=config.sft_eval_items,
        eval_harmful=8,
        kl_samples=16,
        max_new_tokens=32 if config.sft_rationale else 8,
        train=AlignTrainConfig(
            steps=config.align_steps,
            batch_size=8,
            lr=3e-5,
            seed=config.train.seed,
            device=config.train.device,
            time_limit_s=20,
        ),
    )
    result = dpo(dc, model=model, tokenizer=tokenizer)
    print(f"({time.perf_counter() - t:.1f}s)")
    b, a = result["before"], result["after"]
    return {
        "alignment": f"DPO (full, beta {dc.beta}) on {result['train_pairs']} verifiable pairs: "
        f"{result['steps']} steps, {result['train_seconds']:.0f}s; held-out pair accuracy "
        f"{result['held_out_pairs']['reward_accuracy']:.3f}",
        "alignment verifier reward before → after": f"{b['reward']:.3f} → {a['reward']:.3f}",
        "alignment exact match before → after": f"{b['exact_match']:.3f} → {a['exact_match']:.3f}",
        "alignment refusal rate (held-out harmful requests) before → after": (
            f"{b['refusal_rate']:.3f} → {a['refusal_rate']:.3f}"
        ),
        "alignment KL to the SFT model (nats/response)": f"{a['kl']:.3f} ± {a['kl_stderr']:.3f}",
    }


def _quantization(
    model: Transformer, tokenizer, val_data, config: RunConfig, out: Path
) -> tuple[dict[str, str], dict]:
    """Quantize copies of the pre-trained model (seed 002 §5.4: int8 per output channel, int4
    per group of inputs, round-to-nearest) and measure what it costs and gains against fp32:
    size on disk, batch-1 decode tokens/s and perplexity on the first validation windows the
    trainer scored (up to 4 batches: the stage takes seconds). Report lines and a summary dict;
    the checkpoints stay in out/quantized."""
    import copy

    import torch.nn.functional as F

    from lmforge.compress.quantized_model import quantize_model, save_quantized
    from lmforge.infer.generate import SamplingParams, generate

    t = _stage("quantization")
    c = config.train
    windows = list(val_data.eval_batches(c.batch_size, c.seq_len, min(c.eval_batches, 4)))
    ins = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    # The largest usual group size that tiles every layer (the demo's MLP width 704 is 11 x 64).
    group = next((g for g in (128, 64, 32) if all(i % g == 0 for i in ins)), 0)
    variants = {"fp32": None, "int8 RTN per-channel": (8, 128)}  # (int8 ignores the group)
    if group:
        variants[f"int4 RTN g{group}"] = (4, group)
    prompt = tokenizer.encode(config.prompts[0], add_bos=True)[:16]
    new = min(16, config.model.max_seq_len - len(prompt))

    def seconds(m, n):  # the faster of 2 runs; no EOS, so every run makes n tokens
        params = SamplingParams(max_new_tokens=n, temperature=0)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            generate(m, [prompt], params)
            times.append(time.perf_counter() - start)
        return min(times)

    results: dict[str, dict] = {}
    for name, how in variants.items():
        if how is None:
            q, size = model, (out / "model" / "model.safetensors").stat().st_size
        else:
            q = quantize_model(copy.deepcopy(model), "rtn", how[0], how[1])
            path = save_quantized(q, out / "quantized" / name.split()[0], tokenizer=tokenizer)
            size = (path / "model.safetensors").stat().st_size
        with torch.no_grad():  # the loss on full logits (a quantized output layer has no .weight)
            nll = [
                F.cross_entropy(q(x).flatten(0, 1).float(), y.flatten()).item() for x, y in windows
            ]
        rate = (new - 1) / max(seconds(q, new) - seconds(q, 1), 1e-9)
        results[name] = {
            "size_bytes": size,
            "val_perplexity": float(torch.tensor(sum(nll) / len(nll)).exp()),
            "decode_tokens_per_s": rate,
        }
    base = results["fp32"]
    lines = {}
    for name, r in results.items():
        cost = 100 * (r["val_perplexity"] / base["val_perplexity"] - 1)
        speed = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        line = (
            f"{r['size_bytes'] / 1e6:.1f} / {r['decode_tokens_per_s']:.0f} / "
            f"{r['val_perplexity']:.2f}"
        )
        if r is not base:
            line += (
                f" ({base['size_bytes'] / r['size_bytes']:.1f}x smaller, {speed:.2f}x speed, "
                f"perplexity {cost:+.2f}%)"
            )
        lines[f"quantization {name}: size MB / decode tok/s / val perplexity"] = line
        print(f"{name}: {line}")
    print(f"({time.perf_counter() - t:.1f}s)")
    return lines, results


def _chat_answers(config: RunConfig) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Greedy answers of a released chat model (GGUF or any loadable model): report facts and a
    Markdown section. Skipped with a note when the model is not installed."""
    from lmforge.errors import CheckpointError
    from lmforge.infer.chat import ChatSession
    from lmforge.infer.generate import SamplingParams
    from lmforge.loading import load, load_tokenizer

    t = _stage(f"chat ({config.chat_model})")
    try:
        model, tokenizer = load(config.chat_model), load_tokenizer(config.chat_model)
    except CheckpointError as e:
        print(f"skipped: {e}")
        return {"chat model": f"skipped ({e})"}, []
    params = SamplingParams(max_new_tokens=config.chat_tokens, temperature=0)
    body, tokens, start = [], 0, time.perf_counter()
    for question in config.chat_questions:
        session = ChatSession(model, tokenizer, params)
        answer = session.ask(question)
        tokens += len(tokenizer.encode(answer))
        print(f"--- {question}\n{answer}")
        body += [f"**User:** {question}", "", f"**Assistant:** {answer}", ""]
    rate = tokens / (time.perf_counter() - start)
    print(f"({time.perf_counter() - t:.1f}s)")
    facts = {
        "chat model": f"{config.chat_model}: {model.num_params():,} parameters, "
        f"~{rate:.0f} tokens/s answering"
    }
    return facts, [(f"Chat — {config.chat_model} (greedy)", "\n".join(body))]


def run(config: RunConfig) -> Path:
    """Run the pipeline; returns the path of report.md."""
    from lmforge.data.default_corpus import corpus_or_default
    from lmforge.data.shards import TokenShards, unigram_entropy, write_shards
    from lmforge.infer.generate import SamplingParams, generate
    from lmforge.report import write_report
    from lmforge.tokenizer import train_bpe

    start = time.perf_counter()
    out = Path(config.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(config, out / "run.yaml")

    t = _stage("corpus + tokenizer")
    docs = corpus_or_default(config.data, skip_bad=config.skip_bad)
    docs, cleaning = _clean(docs, config, out) if config.clean_steps else (docs, {})
    texts = [d["text"] for d in docs]
    corpus_chars = sum(len(s) for s in texts)
    tokenizer = train_bpe(texts, config.vocab_size)
    tokenizer.save(out / "tokenizer")
    print(
        f"{len(texts):,} documents, {corpus_chars:,} characters; "
        f"{tokenizer.vocab_size} tokens ({time.perf_counter() - t:.1f}s)"
    )

    t = _stage("token shards")
    shard_dir = out / "shards"
    index = write_shards(
        docs,
        tokenizer,
        shard_dir,
        val_fraction=config.val_fraction,
        seed=config.train.seed,
        overwrite=True,
    )
    train_data, val_data = TokenShards(shard_dir, "train"), TokenShards(shard_dir, "validation")
    entropy = unigram_entropy(shard_dir, "train")
    print(
        f"train {train_data.n_tokens:,} tokens, validation {val_data.n_tokens:,} tokens; "
        f"unigram entropy {entropy:.3f} nats/token ({time.perf_counter() - t:.1f}s)"
    )

    t = _stage("pre-training")
    # Round the vocabulary up to a multiple of 64: the extra rows are never targets but make
    # the output matmul faster.
    model_config = config.model
    model_config.vocab_size = round_up(tokenizer.vocab_size)
    torch.manual_seed(config.train.seed)
    model = Transformer(model_config)
    trainer = Trainer(model, config.train, train_data, out, val_data=val_data, tokenizer=tokenizer)
    summary = trainer.fit()
    print(
        f"validation loss {summary['final_val_loss']:.3f} vs unigram entropy {entropy:.3f} "
        f"({time.perf_counter() - t:.1f}s)"
    )

    t = _stage("samples")
    model.eval()
    params = SamplingParams(
        max_new_tokens=config.sample_tokens, temperature=0.8, top_p=0.95, seed=config.train.seed
    )
    prompts = [
        tokenizer.encode(p, add_bos=True) for p in config.prompts
    ]  # documents start with BOS
    results = generate(model, prompts, params, tokenizer=tokenizer)
    samples = [(p, r.text) for p, r in zip(config.prompts, results)]
    for prompt, text in samples:
        print(f"--- {prompt}{text}")

    quantized, quant_summary = (
        _quantization(model, tokenizer, val_data, config, out) if config.quantize else ({}, {})
    )
    evaluation = _evaluate(model, tokenizer, config, out) if config.eval_tasks else {}
    tuning = _instruction_tuning(model, tokenizer, config, out) if config.sft_steps else {}
    # DPO trains every weight: a LoRA/adapter-tuned model would first need its adapter merged.
    aligned = (
        _alignment(model, tokenizer, config, out)
        if config.align and (config.sft_method == "full" or not config.sft_steps)
        else {}
    )
    chat_facts, chat_section = _chat_answers(config) if config.chat_model else ({}, [])

    facts = {
        "corpus": ", ".join(config.data)
        if config.data
        else "Python documentation (pydoc topics + stdlib docstrings)",
        "documents / characters": f"{len(texts):,} / {corpus_chars:,}",
        **cleaning,
        "tokenizer": f"byte-level BPE, {tokenizer.vocab_size} tokens",
        "train / validation tokens": f"{train_data.n_tokens:,} / {val_data.n_tokens:,}",
        "model": f"{model_config.n_layers} layers, d_model {model_config.d_model}, "
        f"{model_config.n_heads} heads ({model_config.kv_heads} KV), "
        f"{model_config.mlp}, {model_config.position}, {model_config.norm}",
        "parameters (total / non-embedding)": f"{model.num_params():,} / {model.num_params(non_embedding=True):,}",
        "tokens seen": summary["tokens_seen"],
        "training time (s)": round(summary["train_seconds"], 1),
        "throughput (tokens/s)": round(summary["tokens_per_second"]),
        "MFU (PaLM formula vs measured matmul peak)": f"{100 * summary['mfu']:.0f}% of "
        f"{summary['peak_flops'] / 1e9:.0f} GFLOP/s",
        "optimizer steps": f"{summary['steps']}"
        + (" (stopped by the time limit)" if summary["stopped_by_time_limit"] else ""),
        "final validation loss (nats/token)": round(summary["final_val_loss"], 4),
        "unigram entropy of the corpus (nats/token)": round(entropy, 4),
        "validation perplexity": round(float(torch.tensor(summary["final_val_loss"]).exp()), 2),
        **quantized,
        **evaluation,
        **tuning,
        **aligned,
        **chat_facts,
        "total wall time (s)": round(time.perf_counter() - start, 1),
    }
    notes = (
        "The unigram entropy is the loss of the best model that ignores context; a validation "
        "loss below it means the model has learned to use context."
        + (
            " Quantization rows: round-to-nearest copies of the pre-trained model (checkpoints "
            "in quantized/); ratios are against fp32, speed is batch-1 decode on this machine "
            "as loaded at the time (noisy on shared cores)."
            if quant_summary
            else ""
        )
    )
    report = write_report(
        out,
        "lmforge run",
        facts,
        samples,
        baseline=entropy,
        baseline_label="unigram entropy",
        notes=notes,
        sections=chat_section,
    )
    (out / "summary.json").write_text(
        json.dumps(
            {
                **summary,
                "unigram_entropy": entropy,
                "index": index["splits"],
                "quantization": quant_summary,
            },
            indent=2,
        )
    )
    print(f"\nreport: {report}")
    print(f"browse it with curves and samples: lmforge ui {out.parent}")
    return report
