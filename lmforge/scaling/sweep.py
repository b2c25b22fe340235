"""A scaling sweep: train every (model size, token budget) pair on one corpus, one tokenizer.

Each run is an ordinary run directory (`out/runs/<name>/`) ending in `summary.json`, so an
interrupted sweep resumes: finished runs are skipped and partial ones continue from their
checkpoint. `collect_runs` reads the summaries back for fitting (Hoffmann et al. 2022, approach 3).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmforge.config import field_, from_dict, save_yaml
from lmforge.data.default_corpus import corpus_or_default
from lmforge.data.shards import TokenShards, read_index, write_shards
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.config import round_up
from lmforge.tokenizer import Tokenizer, train_bpe
from lmforge.train.trainer import TrainConfig, Trainer


@dataclass
class SweepConfig:
    """Model sizes x token budgets, trained with one recipe; plus an optional held-out run."""

    data: list[str] = field_([], "corpus files or folders (default: Python's own documentation)")
    out: str = field_("runs/sweep", "sweep directory: data/ (tokenizer, shards) and runs/")
    vocab_size: int = field_(4096, "BPE vocabulary size", ge=257)
    val_fraction: float = field_(0.05, "fraction of documents held out", gt=0, le=0.5)
    seq_len: int = field_(128, "tokens per sequence", ge=1)
    batch_size: int = field_(16, "sequences per optimizer step", ge=1)
    sizes: list[dict] = field_(
        [
            {"d_model": 64, "n_layers": 2, "n_heads": 2},
            {"d_model": 96, "n_layers": 3, "n_heads": 3},
            {"d_model": 128, "n_layers": 4, "n_heads": 4},
        ],
        "model sizes, each a partial ModelConfig (the rest: ModelConfig defaults)",
    )
    token_budgets: list[int] = field_(
        [125_000, 250_000, 500_000, 1_000_000], "training tokens per run"
    )
    lr: float = field_(3e-3, "peak learning rate (cosine decay to 10%)", gt=0)
    warmup_fraction: float = field_(0.05, "linear warm-up as a fraction of each run", ge=0, le=1)
    eval_batches: int = field_(32, "validation batches for the final loss", ge=1)
    save_every: int = field_(
        200, "checkpoint every N steps, for resuming (0: only at the end)", ge=0
    )
    seed: int = field_(0, "seed of tokenizer split, model init and data order")
    holdout: dict | None = field_(
        None, "a larger run kept out of the fit: {size: {...partial ModelConfig}, tokens: N}"
    )

    def validate(self) -> None:
        if not self.sizes or not self.token_budgets:
            raise ConfigError("sizes and token_budgets must not be empty")
        step_tokens = self.batch_size * self.seq_len
        budgets = list(self.token_budgets)
        for i, size in enumerate(self.sizes):
            self.model_config(size, name=f"sizes[{i}]")
        if self.holdout is not None:
            if set(self.holdout) != {"size", "tokens"}:
                raise ConfigError(f"holdout: expected keys size and tokens, got {self.holdout}")
            self.model_config(self.holdout["size"], name="holdout.size")
            budgets.append(self.holdout["tokens"])
        for tokens in budgets:
            if not isinstance(tokens, int) or tokens < step_tokens:
                raise ConfigError(
                    f"token budget {tokens!r} is below one step (batch_size*seq_len={step_tokens})"
                )
        names = [run_name(self.model_config(size), tokens) for size, tokens, _ in self.plan()]
        if len(set(names)) < len(names):
            raise ConfigError(f"two runs share a directory name (sizes or budgets repeat): {names}")

    def plan(self) -> list[tuple[dict, int, bool]]:
        """Every run as (size, tokens, held out), the held-out run last."""
        runs = [(size, tokens, False) for size in self.sizes for tokens in self.token_budgets]
        if self.holdout is not None:
            runs.append((self.holdout["size"], self.holdout["tokens"], True))
        return runs

    def model_config(
        self, size: dict, *, vocab_size: int = 8192, name: str = "size"
    ) -> ModelConfig:
        """The full ModelConfig of a partial `size` (context length follows seq_len)."""
        if not isinstance(size, dict):
            raise ConfigError(f"{name}: expected a mapping of ModelConfig fields, got {size!r}")
        base = {"max_seq_len": self.seq_len, "vocab_size": vocab_size}
        return from_dict(ModelConfig, {**base, **size}, prefix=f"{name}.")


def run_name(model: ModelConfig, tokens: int) -> str:
    """Directory name of one run, e.g. `d64-l2-h2-t100000`."""
    return f"d{model.d_model}-l{model.n_layers}-h{model.n_heads}-t{tokens}"


def prepare_data(config: SweepConfig) -> tuple[Tokenizer, TokenShards, TokenShards]:
    """Tokenizer and token shards in `out/data/`, built once and reused by every run."""
    data_dir = Path(config.out) / "data"
    tok_dir, shard_dir = data_dir / "tokenizer", data_dir / "shards"
    docs = None
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(tok_dir)
    else:
        docs = corpus_or_default(config.data)
        tokenizer = train_bpe([d["text"] for d in docs], config.vocab_size)
        tokenizer.save(tok_dir)
    index_file = shard_dir / "index.json"
    if not index_file.is_file() or read_index(shard_dir)["tokenizer_sha256"] != tokenizer.sha256:
        write_shards(
            docs if docs is not None else corpus_or_default(config.data),
            tokenizer,
            shard_dir,
            val_fraction=config.val_fraction,
            seed=config.seed,
            overwrite=True,
        )
    return tokenizer, TokenShards(shard_dir, "train"), TokenShards(shard_dir, "validation")


def run_sweep(config: SweepConfig) -> list[dict]:
    """Train every (size, budget) pair and the held-out run; return their summaries."""
    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(config, out / "sweep.yaml")
    tokenizer, train_data, val_data = prepare_data(config)
    # Round the vocabulary up to a multiple of 64 as `lmforge run` does: faster output matmul.
    vocab = round_up(tokenizer.vocab_size)
    summaries = []
    for size, tokens, holdout in config.plan():
        model_config = config.model_config(size, vocab_size=vocab)
        run_dir = out / "runs" / run_name(model_config, tokens)
        if (run_dir / "summary.json").is_file():
            summaries.append(json.loads((run_dir / "summary.json").read_text()))
            continue
        print(f"== {run_dir.name}", flush=True)
        summary = _train_one(config, model_config, tokens, run_dir, tokenizer, train_data, val_data)
        summaries.append({**summary, "size": size, "holdout": holdout})
        (run_dir / "summary.json").write_text(json.dumps(summaries[-1], indent=2) + "\n")
    return summaries


def _train_one(config, model_config, tokens, run_dir, tokenizer, train_data, val_data) -> dict:
    steps = max(1, tokens // (config.batch_size * config.seq_len))
    train = TrainConfig(
        steps=steps,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        lr=config.lr,
        warmup_steps=round(config.warmup_fraction * steps),
        eval_every=0,
        eval_batches=config.eval_batches,
        save_every=config.save_every,
        keep_checkpoints=1,
        seed=config.seed,
    )
    torch.manual_seed(config.seed)
    model = Transformer(model_config)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "checkpoints" / "latest").is_file():
        # Interrupted before its first checkpoint: the run starts over, so must its metrics.
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    trainer = Trainer(model, train, train_data, run_dir, val_data=val_data, tokenizer=tokenizer)
    record = {
        "name": run_dir.name,
        "n_params": model.num_params(),
        "n_params_non_embedding": model.num_params(non_embedding=True),
        "matmul_params": model.matmul_params(),
        "tokens": steps * config.batch_size * config.seq_len,
        "token_budget": tokens,
        "steps": steps,
        # PaLM's count: 6 FLOPs per matmul weight per token plus the attention-score term.
        "flops_per_token": model.flops_per_token(config.seq_len),
        "tokenizer_sha256": tokenizer.sha256,
        "model": asdict(model_config),
    }
    record["flops"] = record["flops_per_token"] * record["tokens"]
    try:
        result = trainer.fit()
    except FloatingPointError as e:
        # One unstable (size, lr) pair should not cost the rest of the sweep; it is left out of
        # the fit by `collect_runs` and listed in the report.
        return {**record, "status": "diverged", "error": str(e), "final_val_loss": None}
    return {
        **record,
        "status": "ok",
        "final_val_loss": result["final_val_loss"],
        "tokens": result["tokens_seen"],
        "train_seconds": result["train_seconds"],
    }


def collect_runs(paths: str | Path | list[str | Path]) -> list[dict]:
    """Summaries of the runs under `paths` (run or sweep directories); each gets `path` and
    `excluded` (None, or why it must stay out of a fit: diverged, another tokenizer)."""
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    files = []
    for p in map(Path, paths):
        found = [p / "summary.json"] if (p / "summary.json").is_file() else []
        files += found or sorted(p.glob("runs/*/summary.json")) or sorted(p.glob("*/summary.json"))
    runs = []
    for file in dict.fromkeys(files):
        run = json.loads(file.read_text())
        runs.append({**run, "path": str(file.parent), "excluded": None})
    # Losses in nats/token are only comparable under one tokenizer: keep the majority's.
    majority = Counter(r.get("tokenizer_sha256") for r in runs).most_common(1)
    for run in runs:
        loss = run.get("final_val_loss")
        if run.get("status") != "ok" or loss is None or not math.isfinite(loss):
            run["excluded"] = f"status {run.get('status')}: {run.get('error', 'no final loss')}"
        elif run.get("tokenizer_sha256") != majority[0][0]:
            sha = str(run.get("tokenizer_sha256"))[:12]
            run["excluded"] = f"tokenizer {sha} differs from the majority's {majority[0][0][:12]}"
    return runs


def fit_runs(runs: list[dict], *, params: str = "n_params_non_embedding", **kwargs):
    """Fit the Chinchilla law to the usable, not held-out runs (N = `params`, D = tokens)."""
    from lmforge.scaling.fit import fit_chinchilla

    used = [r for r in runs if r["excluded"] is None and not r.get("holdout")]
    if len(used) < 5:
        raise ConfigError(f"a fit of 5 constants needs at least 5 usable runs, got {len(used)}")
    return fit_chinchilla(
        [r[params] for r in used],
        [r["tokens"] for r in used],
        [r["final_val_loss"] for r in used],
        **kwargs,
    )
