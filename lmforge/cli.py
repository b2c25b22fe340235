"""`lmforge <command>`: builds the command's config (YAML file + --section.key=value overrides)
and calls the stage's function. Errors about the user's input print one line, no traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from lmforge.config import build, help_text
from lmforge.errors import LmforgeError


def _commands() -> dict[str, tuple[type, Callable[[Any], Any], str]]:
    from lmforge.adapt.contrastive import EmbedConfig, embed_command
    from lmforge.adapt.dpo import DPOConfig, dpo
    from lmforge.adapt.finetune import FinetuneConfig, finetune
    from lmforge.adapt.ppo import PPOConfig, ppo
    from lmforge.adapt.rejection import RejectionConfig, rejection
    from lmforge.adapt.reward import RewardConfig, reward_command
    from lmforge.adapt.sft import SFTConfig, sft
    from lmforge.compress.commands import QuantizeConfig, quantize_command
    from lmforge.compress.distill import DistillConfig, distill
    from lmforge.compress.prune import PruneConfig, prune_command
    from lmforge.data.pipeline import PipelineConfig, process_command
    from lmforge.evaluation.harness import EvalConfig, eval_command
    from lmforge.experiments import registry as runs
    from lmforge.experiments.sweep import SweepConfig as SearchConfig
    from lmforge.experiments.sweep import sweep_command as search_command
    from lmforge.model_describe import DescribeConfig, describe_command
    from lmforge.run import RunConfig, run
    from lmforge.scaling.commands import (
        FitConfig,
        PlanConfig,
        fit_command,
        plan_command,
        sweep_command,
    )
    from lmforge.scaling.sweep import SweepConfig
    from lmforge.stages import (
        ChatConfig,
        ConvertConfig,
        GenerateConfig,
        ServeConfig,
        TokenizeConfig,
        TokenizerTrainConfig,
        chat,
        convert,
        generate_text,
        serve,
        tokenize_corpus,
        train_tokenizer,
    )
    from lmforge.train.pretrain import PretrainConfig, pretrain
    from lmforge.web.runs import UIConfig, ui_command

    return {
        "run": (RunConfig, run, "the whole pipeline on a small default, with a report card"),
        "tokenizer train": (TokenizerTrainConfig, train_tokenizer, "train a byte-level BPE"),
        "data tokenize": (TokenizeConfig, tokenize_corpus, "tokenize a corpus into shards"),
        "data process": (
            PipelineConfig,
            process_command,
            "clean, de-duplicate, redact, mix a corpus",
        ),
        "pretrain": (PretrainConfig, pretrain, "pre-train a model on token shards"),
        "model describe": (
            DescribeConfig,
            describe_command,
            "parameters, FLOPs/token and training memory of a recipe",
        ),
        "generate": (GenerateConfig, generate_text, "continue prompts with a model"),
        "chat": (ChatConfig, chat, "a chat REPL with a model"),
        "serve": (ServeConfig, serve, "an OpenAI-compatible HTTP server for a model"),
        "convert": (
            ConvertConfig,
            convert,
            "convert lmforge <-> Hugging Face checkpoints, or to GGUF",
        ),
        "scaling sweep": (SweepConfig, sweep_command, "train a grid of runs, fit the scaling law"),
        "scaling fit": (FitConfig, fit_command, "fit the Chinchilla law to finished runs"),
        "plan": (PlanConfig, plan_command, "compute-optimal model and data size for a budget"),
        "eval": (EvalConfig, eval_command, "evaluate a model on tasks (results.json, samples)"),
        "sft": (SFTConfig, sft, "instruction-tune a model: full, LoRA, adapter, prefix, prompt"),
        "embed": (EmbedConfig, embed_command, "mean-pooled sentence embeddings of a file of texts"),
        "reward": (RewardConfig, reward_command, "train a reward model on preference pairs"),
        "dpo": (DPOConfig, dpo, "align a model on preference pairs with DPO or IPO"),
        "ppo": (PPOConfig, ppo, "RLHF with PPO (value head, KL penalty) or GRPO"),
        "finetune": (FinetuneConfig, finetune, "task head + freezing: classify, regress, tag"),
        "rejection": (RejectionConfig, rejection, "best-of-n rejection-sampling fine-tuning"),
        "sweep": (SearchConfig, search_command, "hyperparameter search over any command (Optuna)"),
        "runs list": (runs.RunsListConfig, runs.list_command, "list and filter run directories"),
        "runs compare": (runs.RunsCompareConfig, runs.compare_command, "config diff + metrics"),
        "runs best": (runs.RunsBestConfig, runs.best_command, "path of the best run by a metric"),
        "runs tag": (runs.RunsTagConfig, runs.tag_command, "add or remove tags of a run"),
        "runs delete": (runs.RunsDeleteConfig, runs.delete_command, "delete run directories"),
        "ui": (
            UIConfig,
            ui_command,
            "browse runs in a web page: curves, evaluations, data statistics",
        ),
        "quantize": (
            QuantizeConfig,
            quantize_command,
            "quantize a model: rtn|gptq|nf4|llm_int8|smoothquant",
        ),
        "prune": (PruneConfig, prune_command, "prune weights (magnitude) or heads/channels"),
        "distill": (DistillConfig, distill, "distil a teacher into a smaller student"),
    }


def usage(commands: dict) -> str:
    lines = ["usage: lmforge <command> [CONFIG.yaml] [--section.key=value ...]", "", "commands:"]
    lines += [f"  {name:<18} {doc}" for name, (_, _, doc) in commands.items()]
    lines += ["", "`lmforge <command> --help` lists every option with its default."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    name = next((n for n in commands if argv[: len(n.split())] == n.split()), None)
    if name is None:
        print(
            usage(commands),
            file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
        )
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    cls, fn, doc = commands[name]
    args = argv[len(name.split()) :]
    if "-h" in args or "--help" in args:
        print(f"lmforge {name}: {doc}\n\n{cls.__doc__}\n\noptions:\n{help_text(cls)}")
        return 0
    yaml_path = args.pop(0) if args and not args[0].startswith("--") else None
    positional = getattr(cls, "POSITIONAL", None)
    if positional and yaml_path is not None:  # e.g. `lmforge model describe gpt2-124m`
        args, yaml_path = [f"--{positional}={yaml_path}", *args], None
    try:
        fn(build(cls, yaml_path, args))
    except (LmforgeError, ValueError) as e:
        # Bad input (LmforgeError) or bad arguments to a library call (ValueError, e.g. a prompt
        # longer than the model's context): one line. LMFORGE_DEBUG=1 shows the traceback.
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
