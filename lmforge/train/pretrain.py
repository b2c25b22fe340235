"""`lmforge pretrain`: pre-training of a Transformer on token shards with any objective of
lmforge.train.objectives (causal LM, prefix LM, span corruption, UL2, masked LM + NSP)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lmforge.config import field_, save_yaml
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.train import distributed
from lmforge.train.objectives import (
    ObjectiveBatches,
    ObjectiveOptions,
    check_objective,
    objective_batches,
    objective_loss,
)
from lmforge.train.trainer import TrainConfig, Trainer


@dataclass
class PretrainConfig:
    """Pre-train a model from scratch (or continue one) on token shards."""

    model: ModelConfig = field_(ModelConfig(), "architecture of the model to train")
    train: TrainConfig = field_(TrainConfig(), "optimisation and bookkeeping")
    objective: Literal["causal", "prefix", "span", "ul2", "mlm"] = field_(
        "causal",
        "causal LM, prefix LM, T5 span corruption, UL2 mixture of denoisers, or masked LM (+ NSP "
        "when model.nsp_head); all read the same shards (docs/objectives.md)",
    )
    objective_options: ObjectiveOptions = field_(
        ObjectiveOptions(), "settings of the prefix/span/ul2/mlm objectives"
    )
    data: str = field_("", "token shard directory written by `lmforge data tokenize`")
    tokenizer: str = field_(
        "", "tokenizer saved with the model (default: the one in the shard dir)"
    )
    init_from: str = field_("", "start from this checkpoint's weights instead of a random init")
    out: str = field_("runs/pretrain", "run directory (metrics, checkpoints, final model)")
    nproc: int = field_(
        1,
        "processes on this machine (> 1: relaunch under torch's elastic agent, as torchrun "
        "would; under torchrun itself the world size comes from torchrun)",
        ge=1,
    )

    def validate(self) -> None:
        check_objective(self.objective, self.model, self.objective_options)


def check_fit(model_config: ModelConfig, train: TrainConfig, vocab_size: int, source: str) -> None:
    """Fail early, naming the problem, when the data cannot be fed to the model."""
    if vocab_size > model_config.vocab_size:
        raise ConfigError(
            f"the vocabulary of {source} ({vocab_size} tokens) does not fit the model "
            f"(model.vocab_size={model_config.vocab_size}); set --model.vocab_size={vocab_size}"
        )
    if train.seq_len > model_config.max_seq_len:
        raise ConfigError(
            f"train.seq_len={train.seq_len} exceeds the model's maximum "
            f"(model.max_seq_len={model_config.max_seq_len})"
        )


def pretrain(config: PretrainConfig) -> dict:
    """Build data, tokenizer and model from the config and train; returns the run summary
    (rank 0's when several processes train)."""
    if config.nproc > 1 and not distributed.launched_by_torchrun():
        return distributed.launch(config.nproc, _pretrain_process, config)
    # Leave a process group that the caller set up alone; close the one joined here.
    joined = distributed.launched_by_torchrun() and not torch.distributed.is_initialized()
    env = distributed.init(config.train.device, config.train.dist_timeout_s)
    try:
        summary = _pretrain(config, env)
    except BaseException:
        if joined:
            distributed.shutdown(clean=False)
        raise
    if joined:
        distributed.shutdown()
    return summary


def _pretrain_process(config: PretrainConfig) -> dict:
    """One rank of `lmforge pretrain --nproc N` (module level: the launcher pickles it)."""
    return pretrain(config)


def _pretrain(config: PretrainConfig, env: distributed.DistEnv) -> dict:
    from lmforge.data.shards import TokenShards
    from lmforge.loading import load
    from lmforge.tokenizer import Tokenizer

    if not config.data:
        raise ConfigError("data: give the token shard directory (--data=DIR)")
    train_data = TokenShards(config.data, "train")
    val_data = TokenShards(config.data, "validation")
    tokenizer = None
    if config.tokenizer:
        tokenizer = Tokenizer.load(config.tokenizer)
    elif (Path(config.data) / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(config.data)
    check_fit(config.model, config.train, train_data.vocab_size, config.data)

    torch.manual_seed(config.train.seed)
    if config.init_from:
        model = load(config.init_from)
        if model.config != config.model:
            config.model = model.config
            check_fit(config.model, config.train, train_data.vocab_size, config.data)
    else:
        model = Transformer(config.model)
    out = Path(config.out)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(config, out / "run.yaml")  # not config.yaml: that name marks a model dir
    extra = {}
    if config.objective != "causal" or config.model.arch != "causal":
        if config.train.parallel == "pp":
            raise ConfigError(
                f"objective={config.objective!r} with model.arch={config.model.arch!r} cannot "
                "run under train.parallel=pp (the pipeline schedule feeds causal-LM batches)"
            )
        train_data, val_data = (
            objective_batches(
                config.objective,
                config.model,
                data,
                tokenizer=tokenizer,
                options=config.objective_options,
            )
            for data in (train_data, val_data)
        )
        extra = {"objective": objective_loss, "tokens_per_batch": ObjectiveBatches.tokens_in}
    trainer = Trainer(
        model, config.train, train_data, out, val_data=val_data, tokenizer=tokenizer, **extra
    )
    return trainer.fit()
