"""Configs and entry functions of the small commands: tokenizer training, tokenizing a corpus,
generation, chat and checkpoint conversion. Each is callable from Python and from the CLI."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.config import field_
from lmforge.errors import ConfigError


@dataclass
class TokenizerTrainConfig:
    """Train a byte-level BPE tokenizer on a corpus."""

    input: list[str] = field_([], "text/JSONL/Parquet files, folders or globs")
    vocab_size: int = field_(8192, "vocabulary size including special tokens", ge=257)
    min_frequency: int = field_(2, "minimum pair frequency for a merge", ge=1)
    text_key: str = field_("text", "field holding the text in JSONL/Parquet")
    skip_bad: bool = field_(False, "skip files that are not UTF-8 instead of failing")
    out: str = field_("tokenizer", "directory to write tokenizer.json into")


def train_tokenizer(config: TokenizerTrainConfig):
    from lmforge.data.sources import iter_documents
    from lmforge.tokenizer import train_bpe

    if not config.input:
        raise ConfigError("input: give at least one corpus file or folder (--input=PATH)")
    stats: dict = {}
    docs = iter_documents(
        config.input, text_key=config.text_key, skip_bad=config.skip_bad, stats=stats
    )
    tokenizer = train_bpe(
        (d["text"] for d in docs), config.vocab_size, min_frequency=config.min_frequency
    )
    Path(config.out).mkdir(parents=True, exist_ok=True)
    tokenizer.save(config.out)
    if stats.get("skipped_files"):
        print(f"skipped {stats['skipped_files']} file(s) that are not UTF-8", file=sys.stderr)
    print(f"tokenizer with {tokenizer.vocab_size} tokens written to {config.out}")
    return tokenizer


@dataclass
class TokenizeConfig:
    """Tokenize a corpus into token shards (train/validation split by document)."""

    input: list[str] = field_([], "text/JSONL/Parquet files, folders or globs")
    tokenizer: str = field_("", "tokenizer directory or tokenizer.json")
    out: str = field_("shards", "output shard directory")
    val_fraction: float = field_(
        0.01, "fraction of documents held out for validation", ge=0, le=0.5
    )
    seed: int = field_(0, "seed of the train/validation split")
    text_key: str = field_("text", "field holding the text in JSONL/Parquet")
    skip_bad: bool = field_(False, "skip files that are not UTF-8 instead of failing")
    overwrite: bool = field_(False, "replace an existing shard directory")


def tokenize_corpus(config: TokenizeConfig) -> dict:
    from lmforge.data.shards import write_shards
    from lmforge.data.sources import iter_documents
    from lmforge.tokenizer import Tokenizer

    if not config.input:
        raise ConfigError("input: give at least one corpus file or folder (--input=PATH)")
    if not config.tokenizer:
        raise ConfigError("tokenizer: give a tokenizer directory or file (--tokenizer=PATH)")
    tokenizer = Tokenizer.load(config.tokenizer)
    docs = iter_documents(config.input, text_key=config.text_key, skip_bad=config.skip_bad)
    index = write_shards(
        docs,
        tokenizer,
        config.out,
        val_fraction=config.val_fraction,
        seed=config.seed,
        overwrite=config.overwrite,
    )
    tokenizer.save(config.out)  # shards carry their tokenizer, so pretrain needs only --data
    for split, files in index["splits"].items():
        n = sum(f["tokens"] for f in files)
        docs_n = sum(f["documents"] for f in files)
        print(f"{split}: {docs_n:,} documents, {n:,} tokens")
    return index


@dataclass
class SamplingConfig:
    """Decoding settings shared by generate and chat."""

    max_new_tokens: int = field_(128, "tokens to generate at most", ge=1)
    temperature: float = field_(0.8, "softmax temperature (0: greedy)", ge=0)
    top_k: int = field_(0, "sample from the k most likely tokens (0: off)", ge=0)
    top_p: float = field_(0.95, "nucleus sampling mass", gt=0, le=1)
    repetition_penalty: float = field_(1.0, "CTRL repetition penalty (1: off)", gt=0)
    stop: list[str] = field_([], "stop strings")
    seed: int | None = field_(None, "seed for reproducible sampling")


def _sampling_params(s: SamplingConfig):
    from lmforge.infer.generate import SamplingParams

    return SamplingParams(
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        repetition_penalty=s.repetition_penalty,
        stop_strings=tuple(s.stop),
        seed=s.seed,
    )


@dataclass
class GenerateConfig:
    """Continue one or more prompts with a model."""

    model: str = field_("", "checkpoint, run, Hugging Face directory, GGUF file or 'smollm2'")
    prompt: list[str] = field_([], "prompt text(s); several are decoded as one batch")
    sampling: SamplingConfig = field_(SamplingConfig(), "decoding settings")
    device: str = field_("cpu", "cpu or cuda")


def generate_text(config: GenerateConfig) -> list[str]:
    from lmforge.infer.generate import generate
    from lmforge.loading import load, load_tokenizer

    if not config.model or not config.prompt:
        raise ConfigError("give --model=PATH and at least one --prompt=TEXT")
    model, tokenizer = load(config.model, device=config.device), load_tokenizer(config.model)
    prompts = [tokenizer.encode(p, add_bos=tokenizer.adds_bos) for p in config.prompt]
    results = generate(model, prompts, _sampling_params(config.sampling), tokenizer=tokenizer)
    texts = [r.text for r in results]
    for prompt, text in zip(config.prompt, texts):
        print(f"{prompt}{text}\n")
    return texts


@dataclass
class ChatConfig:
    """Chat with a model through its own chat template (ChatML when it has none)."""

    model: str = field_("", "checkpoint, run, Hugging Face directory, GGUF file or 'smollm2'")
    system: str = field_("", "system prompt")
    sampling: SamplingConfig = field_(SamplingConfig(max_new_tokens=256), "decoding settings")
    device: str = field_("cpu", "cpu or cuda")
    cot: Literal["none", "zeroshot", "fewshot"] = field_(
        "none", "chain-of-thought: 'Let's think step by step' or arithmetic exemplars"
    )
    self_consistency: int = field_(1, "sampled answers per reply, majority vote (1: off)", ge=1)
    tools: list[str] = field_([], "tools the model may call: calculator, retrieval")
    docs: str = field_("", "folder of .txt/.md files the retrieval tool searches")
    embedder: str = field_(
        "",
        "encoder checkpoint whose sentence embeddings rank --docs passages and few-shot "
        "demonstrations (default: BM25)",
    )


def chat(config: ChatConfig) -> None:
    from lmforge.infer.chat import ChatSession, repl
    from lmforge.infer.tools import make_tools
    from lmforge.loading import load, load_tokenizer

    if not config.model:
        raise ConfigError("give --model=PATH")
    from lmforge.infer.server import load_embedder

    embed = load_embedder(config.embedder) if config.embedder else None
    # A bad folder fails before the model loads.
    tools = make_tools(config.tools, config.docs or None, embed=embed)
    model, tokenizer = load(config.model, device=config.device), load_tokenizer(config.model)
    session = ChatSession(
        model,
        tokenizer,
        _sampling_params(config.sampling),
        system=config.system,
        cot=config.cot,
        self_consistency=config.self_consistency,
        tools=tools,
    )
    session.docs, session.embed = config.docs or None, embed
    repl(session)


@dataclass
class ServeConfig:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models) with streaming; requests from all clients are batched by one engine."""

    model: str = field_("", "checkpoint, run, Hugging Face directory, GGUF file or 'smollm2'")
    host: str = field_("127.0.0.1", "address to listen on (beyond localhost needs --api-key)")
    port: int = field_(8000, "TCP port", ge=1, le=65535)
    api_key: str = field_("", "require 'Authorization: Bearer KEY' (default: $LMFORGE_API_KEY)")
    name: str = field_("", "model id clients pass as 'model' (default: the file or folder name)")
    max_batch: int = field_(8, "requests decoded together at most", ge=1)
    max_context: int = field_(0, "context window in tokens (0: the model's)", ge=0)
    max_n: int = field_(16, "largest n (and self_consistency) a request may ask for", ge=1)
    max_tokens: int = field_(256, "max_tokens when a request gives none", ge=1)
    docs: str = field_("", "folder of .txt/.md files for the retrieval tool")
    embedder: str = field_(
        "",
        "encoder checkpoint whose sentence embeddings rank --docs passages and few-shot "
        "demonstrations (default: BM25)",
    )
    device: str = field_("cpu", "cpu or cuda")
    ui: bool = field_(False, "also serve a chat page at / (see docs/web.md)")


def serve(config: ServeConfig) -> None:
    import os

    from lmforge.infer.server import serve as run_server

    if not config.model:
        raise ConfigError("give --model=PATH")
    run_server(
        config.model,
        host=config.host,
        port=config.port,
        api_key=config.api_key or os.environ.get("LMFORGE_API_KEY") or None,
        name=config.name,
        device=config.device,
        max_batch=config.max_batch,
        max_context=config.max_context or None,
        max_n=config.max_n,
        default_max_tokens=config.max_tokens,
        docs=config.docs or None,
        embedder=config.embedder or None,
        ui=config.ui,
    )


@dataclass
class ConvertConfig:
    """Convert a model (lmforge checkpoint, run, Hugging Face directory or GGUF file) to an
    lmforge checkpoint, a Hugging Face directory or a GGUF file for llama.cpp."""

    src: str = field_("", "source checkpoint / run / Hugging Face directory / GGUF file")
    dst: str = field_("", "destination directory (a .gguf file for --to=gguf)")
    to: Literal["lmforge", "hf", "gguf"] = field_("lmforge", "destination format")
    gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] = field_(
        "f16", "with --to=gguf: the type of the weight matrices (norms stay f32)"
    )


def convert(config: ConvertConfig) -> Path:
    from lmforge.interop.hf import convert as convert_checkpoint

    if not config.src or not config.dst:
        raise ConfigError("give --src=PATH and --dst=PATH")
    if config.to == "gguf":
        from lmforge.interop.gguf_export import convert_to_gguf

        out = convert_to_gguf(config.src, config.dst, gguf_type=config.gguf_type)
        print(f"wrote GGUF ({config.gguf_type}) to {config.dst}")
        return out
    out = convert_checkpoint(config.src, config.dst, to=config.to)
    print(f"wrote {config.to} checkpoint to {config.dst}")
    return out
