"""`lmforge sft`: supervised instruction tuning (seed 002 §5.1), full or parameter-efficient
(§5.3), of any model `lmforge.load` reads, with exact-match accuracy before and after on held-out
rule-generated items (test split: never trained on)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lmforge.adapt.instruct import (
    EncodeStats,
    Example,
    SFTData,
    Template,
    encode_examples,
    mix,
    render,
    resolve_template,
    sft_loss,
)
from lmforge.adapt.peft import (
    BottleneckConfig,
    LoRAConfig,
    PeftConfig,
    PrefixConfig,
    PromptConfig,
    add_adapter,
    save_adapter,
    trainable_parameters,
)
from lmforge.config import field_, save_yaml, to_dict
from lmforge.data import synthetic
from lmforge.errors import ConfigError
from lmforge.train.trainer import TrainConfig, Trainer


def _sft_train() -> TrainConfig:
    return TrainConfig(
        steps=200, batch_size=8, seq_len=256, lr=1e-3, warmup_steps=10, weight_decay=0.0,
        eval_every=0, save_every=0, log_every=10,
    )  # fmt: skip


@dataclass
class SFTConfig:
    """Instruction-tune a model: full fine-tuning or LoRA / adapter / prefix / prompt tuning."""

    model: str = field_("", "model: lmforge checkpoint or run, Hugging Face directory, GGUF file")
    data: list[str] = field_(
        [], "instruction files (Alpaca JSON, ShareGPT/messages/prompt-completion JSONL); "
        "empty: the rule-generated instruction set",
    )  # fmt: skip
    out: str = field_("runs/sft", "output directory")
    method: Literal["full", "lora", "adapter", "prefix", "prompt"] = field_(
        "lora", "full fine-tuning or a parameter-efficient method"
    )
    lora: LoRAConfig = field_(LoRAConfig(), "LoRA settings")
    adapter: BottleneckConfig = field_(BottleneckConfig(), "adapter tuning settings")
    prefix: PrefixConfig = field_(PrefixConfig(), "prefix tuning settings")
    prompt: PromptConfig = field_(PromptConfig(), "prompt tuning settings")
    template: Template = field_(
        "auto", "ins ([INS]instruction[INS]output), alpaca, chatml, chat (the model's), plain"
    )
    train_on_prompt: bool = field_(False, "also compute the loss on prompts, not only outputs")
    packing: bool = field_(False, "pack short examples into one sequence (block-diagonal)")
    skip_too_long: bool = field_(False, "drop examples whose output does not fit (else: error)")
    synthetic_per_task: int = field_(200, "rule-generated examples per task", ge=1)
    synthetic_tasks: list[str] = field_([], "rule-generated tasks (empty: all of `languages`)")
    languages: list[str] = field_(["en", "zh"], "phrasings of the rule-generated set")
    levels: list[int] = field_([1, 2, 3], "difficulty levels of the rule-generated set")
    rationale: bool = field_(True, "rule-generated outputs carry step-by-step rationales")
    mixing: Literal["proportional", "temperature"] = field_(
        "proportional", "dataset mixing: examples-proportional (with cap) or temperature"
    )
    mixing_cap: int = field_(0, "examples-proportional cap per dataset (0: none)", ge=0)
    mixing_temperature: float = field_(1.0, "temperature of temperature mixing", gt=0)
    examples: int = field_(0, "examples after mixing (0: the sum of the datasets)", ge=0)
    pretrain_data: list[str] = field_([], "text/JSONL files mixed in as pre-training text")
    pretrain_ratio: float = field_(0.0, "fraction of pre-training text in the mix (< 1)", ge=0)
    eval_items: int = field_(8, "held-out items per task scored before and after (0: skip)", ge=0)
    max_new_tokens: int = field_(64, "longest generated answer when scoring", ge=1)
    train: TrainConfig = field_(_sft_train(), "optimisation")


def peft_config(config: SFTConfig) -> PeftConfig:
    return PeftConfig(
        method=config.method, lora=config.lora, adapter=config.adapter, prefix=config.prefix,
        prompt=config.prompt,
    )  # fmt: skip


# ---- scoring ---------------------------------------------------------------------------------
def prompt_ids(example: Example, tokenizer, template: str) -> list[int]:
    """Tokens of the example up to where its (last) output starts: a generation prompt."""
    msgs = [dict(m) for m in example.messages]
    msgs[-1]["content"] = ""
    segments = render(Example(msgs), template, tokenizer)
    last = max(i for i, (_, target) in enumerate(segments) if target)
    bos = [tokenizer.bos_id] if tokenizer.adds_bos and template != "chat" else []
    return bos + [t for text, _ in segments[:last] for t in tokenizer.encode(text)]


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: set[int],
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuations without a KV cache (left-padded batches, full forward per token):
    works for every adapter, prefix and prompt tuning included."""
    out: list[list[int]] = []
    limit = model.config.max_seq_len - _virtual_tokens(model)
    for start in range(0, len(prompts), batch_size):
        group = prompts[start : start + batch_size]
        width = max(len(p) for p in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        new = [[] for _ in group]
        done = [False] * len(group)
        for _ in range(min(max_new_tokens, limit - width)):
            logits = model(ids, attention_mask=mask)[:, -1]
            nxt = logits.argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    if t in stop_ids:
                        done[b] = True
                    else:
                        new[b].append(t)
            if all(done):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(group), 1)], dim=1)
        out += new
    return out


def _virtual_tokens(model: nn.Module) -> int:
    state = getattr(model, "peft", None)
    if state is None or state.active is None:
        return 0
    cfg = state.configs[state.active]
    return cfg.prompt.n_tokens if cfg.method == "prompt" else 0


def extract_answer(text: str) -> str:
    """The final answer: what follows the last "####" (GSM8K style), else the whole text."""
    return (text.rsplit("####", 1)[-1] if "####" in text else text).strip().rstrip("。.")


def exact_match(
    model: nn.Module, tokenizer, items: list, template: str, max_new_tokens: int
) -> tuple[float, list[dict]]:
    """Exact-match accuracy of greedy answers to rule-generated items, and the records."""
    template = resolve_template(template, tokenizer)
    prompts = [
        prompt_ids(Example.from_instance(it.question, ""), tokenizer, template) for it in items
    ]
    stops = {t for t in (tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>")) if t is not None}
    was_training = model.training
    model.eval()
    outputs = greedy_generate(model, prompts, max_new_tokens, stops)
    model.train(was_training)
    records = []
    for it, ids in zip(items, outputs):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        answer = extract_answer(text)
        records.append({"task": it.task, "question": it.question, "gold": it.answer,
                        "output": text, "answer": answer, "correct": answer == it.answer})  # fmt: skip
    return sum(r["correct"] for r in records) / max(1, len(records)), records


# ---- the command -----------------------------------------------------------------------------
def _read_texts(paths: list[str]) -> list[str]:
    from lmforge.data.sources import iter_documents

    return [d["text"] for d in iter_documents(paths)]


def build_examples(config: SFTConfig) -> tuple[list[Example], dict]:
    """The training examples (files or the rule-generated set, mixed) and the mixing report."""
    from lmforge.adapt.instruct import read_examples

    if config.data:
        datasets = {Path(p).stem: read_examples(p) for p in config.data}
    else:
        raw = synthetic.instruction_set(
            config.synthetic_per_task,
            split="train",
            tasks=tuple(config.synthetic_tasks) or None,
            languages=tuple(config.languages),
            levels=tuple(config.levels),
            with_rationale=config.rationale,
            seed=config.train.seed,
        )
        datasets = {
            task: [Example.from_instance(r["instruction"], r["output"], source=task) for r in rows]
            for task, rows in raw.items()
        }
    total = config.examples or sum(len(v) for v in datasets.values())
    pretrain = _read_texts(config.pretrain_data) if config.pretrain_data else []
    return mix(
        datasets,
        total,
        strategy=config.mixing,
        cap=config.mixing_cap or None,
        temperature=config.mixing_temperature,
        pretrain_texts=pretrain,
        pretrain_ratio=config.pretrain_ratio,
        seed=config.train.seed,
    )


def held_out_items(config: SFTConfig) -> list:
    """Test-split items of the rule-generated tasks (disjoint from training by hash)."""
    if not config.eval_items:
        return []
    tasks = config.synthetic_tasks or [
        t for lang in config.languages for t in synthetic.INSTRUCTION_TASKS[lang]
    ]
    return [
        it
        for t in tasks
        for it in synthetic.generate(
            t, config.eval_items, split="test", levels=tuple(config.levels)
        )
    ]


def sft(config: SFTConfig, *, model: nn.Module | None = None, tokenizer=None) -> dict:
    """Run instruction tuning; writes out/model (+ adapter files), metrics and sft.json. A model
    and tokenizer may be passed in directly (then config.model is only their name)."""
    from lmforge.loading import load, load_tokenizer

    if model is None:
        if not config.model:
            raise ConfigError("sft: --model is required (a checkpoint, HF directory or GGUF file)")
        model, tokenizer = load(config.model), load_tokenizer(config.model)
    if config.packing and config.method == "prompt":
        raise ConfigError("prompt tuning puts its soft prompt before the whole row: no --packing")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(config, out / "sft.yaml")
    template = resolve_template(config.template, tokenizer)
    # Sequences must fit the model's window, with room for a soft prompt's virtual tokens.
    virtual = config.prompt.n_tokens if config.method == "prompt" else 0
    config.train.seq_len = min(config.train.seq_len, model.config.max_seq_len - virtual)
    examples, mixing = build_examples(config)
    encoded, stats = encode_examples(
        examples,
        tokenizer,
        template,
        config.train.seq_len,
        train_on_prompt=config.train_on_prompt,
        skip_too_long=config.skip_too_long,
    )
    items = held_out_items(config) if not config.data else []
    t0 = time.perf_counter()
    before = (
        exact_match(model, tokenizer, items, template, config.max_new_tokens)[0] if items else None
    )
    eval_s = time.perf_counter() - t0
    train = config.train
    if config.method != "full":
        add_adapter(model, peft_config(config), tokenizer=tokenizer)
        train.resume = False  # the Trainer's checkpoints hold the base only
    else:
        model.requires_grad_(True)
    trainable = trainable_parameters(model)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    trainer = Trainer(
        model,
        train,
        SFTData(encoded, packing=config.packing, pad_id=pad),
        out,
        objective=sft_loss,
        tokenizer=tokenizer,
        tokens_per_batch=lambda b: b["input_ids"].numel(),
    )
    summary = trainer.fit()
    model.eval()
    if config.method == "prefix":
        model.peft.adapters["default"].drop_reparam()  # Li & Liang 2021: keep only the prefixes
    if config.method != "full":
        save_adapter(model, out / "model", base_name=config.model)
    records: list[dict] = []
    after = None
    if items:
        after, records = exact_match(model, tokenizer, items, template, config.max_new_tokens)
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    result = {
        "method": config.method,
        "template": template,
        "trainable_parameters": trainable,
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "examples": _stats(stats),
        "mixing": mixing,
        "exact_match_before": before,
        "exact_match_after": after,
        "eval_items": len(items),
        "eval_seconds": eval_s,
        "train": {k: v for k, v in summary.items() if isinstance(v, (int, float, bool))},
        "config": to_dict(config),
    }
    (out / "sft.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    _print(result)
    return result


def _stats(stats: EncodeStats) -> dict:
    return {k: v for k, v in stats.__dict__.items() if k != "skipped_where"} | {
        "skipped_examples": stats.skipped_where[:20]
    }


def _print(result: dict) -> None:
    ex = result["examples"]
    print(
        f"sft ({result['method']}, template {result['template']}): {ex['examples']} examples, "
        f"{ex['truncated']} truncated, {ex['skipped']} skipped; trainable "
        f"{result['trainable_parameters']:,} of {result['total_parameters']:,} parameters"
    )
    for name, m in result["mixing"].items():
        print(f"  mix {name}: target {m['target']:.3f}, realised {m['realised']:.3f}")
    if result["exact_match_before"] is not None:
        print(
            f"exact match on {result['eval_items']} held-out items: "
            f"{result['exact_match_before']:.3f} before, {result['exact_match_after']:.3f} after"
        )
