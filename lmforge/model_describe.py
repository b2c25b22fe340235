"""`lmforge model describe`: parameters, FLOPs per token and training memory of a model config,
built on the meta device so that a 7B shape costs no memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lmforge.config import field_, from_dict, load_yaml
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class DescribeConfig:
    """Print a model's parameters, FLOPs per token and training memory (weights, gradients,
    optimizer states, activations) for a recipe, a YAML config or a checkpoint directory."""

    recipe: str = field_("", "recipe name (lmforge/recipes/NAME.yaml), YAML file or model dir")
    batch: int = field_(1, "sequences per batch for the activation estimate", ge=1)
    seq: int = field_(0, "tokens per sequence (0: the model's max_seq_len)", ge=0)
    dtype: Literal["fp32", "bf16", "fp16"] = field_(
        "fp32", "dtype of weights and gradients (activations are 16-bit, see docs)"
    )
    optimizer: Literal["adamw", "adamw8bit"] = field_(
        "adamw", "AdamW with fp32 m and v, or 8-bit block-wise m and v (Dettmers et al. 2022)"
    )
    recompute: Literal["none", "selective", "full"] = field_(
        "none", "activation recomputation assumed by the activation estimate"
    )

    # `lmforge model describe NAME`: the positional argument names the recipe.
    POSITIONAL = "recipe"


def resolve_recipe(spec: str) -> Path:
    """A recipe name, a YAML file, or a directory with config.yaml (a saved model)."""
    path = Path(spec)
    if path.is_dir() and (path / "config.yaml").is_file():
        return path / "config.yaml"
    if path.is_file():
        return path
    named = RECIPE_DIR / f"{spec}.yaml"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
    raise ConfigError(f"recipe {spec!r} is not a file, a model directory or one of: {known}")


def load_model_config(spec: str) -> ModelConfig:
    """The ModelConfig of a recipe: its `model:` section (a pretrain config), or the whole file
    (a checkpoint's config.yaml)."""
    data = load_yaml(resolve_recipe(spec))
    section = data.get("model") if isinstance(data.get("model"), dict) else data
    return from_dict(ModelConfig, section, prefix="model.")


def meta_model(config: ModelConfig) -> Transformer:
    """The model with every tensor on the meta device: shapes only, no memory, no init cost."""
    with torch.device("meta"):
        return Transformer(config)


def optimizer_bytes(model: nn.Module, kind: str) -> int:
    """AdamW's state: m and v in fp32 (8 bytes a parameter). adamw8bit (lmforge.train.adamw8bit):
    one byte each plus an fp32 absmax per 2048-value block, fp32 for tensors under 4096 values."""
    from lmforge.train.adamw8bit import BLOCK, MIN_8BIT_SIZE

    total = 0
    for p in model.parameters():
        n = p.numel()
        if kind == "adamw8bit" and n >= MIN_8BIT_SIZE:
            total += 2 * (n + 4 * -(-n // BLOCK))
        else:
            total += 8 * n
    return total


def activation_bytes(config: ModelConfig, batch: int, seq: int, recompute: str) -> int:
    """Korthikanti et al. 2022 ("Reducing activation recomputation in large transformer
    models", Sec. 4) per layer, 16-bit activations, no tensor parallelism:
    s*b*h*(34 + 5*a*s/h) bytes; selective recomputation keeps s*b*h*34, full keeps only the
    layer input, 2*s*b*h. Decoder layers of an encoder-decoder count as layers too."""
    s, b, h, a = seq, batch, config.d_model, config.n_heads
    per_layer = {
        "none": s * b * h * 34 + 5 * a * s * s * b,
        "selective": s * b * h * 34,
        "full": 2 * s * b * h,
    }[recompute]
    layers = config.n_layers + (config.decoder_layers if config.arch == "encoder_decoder" else 0)
    return layers * per_layer


def describe(config: DescribeConfig) -> dict:
    """The numbers of `describe_command`, as a dict."""
    model_config = load_model_config(config.recipe)
    model = meta_model(model_config)
    seq = config.seq or model_config.max_seq_len
    total = model.num_params()
    non_embedding = model.num_params(non_embedding=True)
    train_flops = model.flops_per_token(seq)
    weight_bytes = total * BYTES[config.dtype]
    logits = 4 * config.batch * seq * model_config.vocab_size  # fp32 logits for the loss
    return {
        "recipe": config.recipe,
        "arch": model_config.arch,
        "params": total,
        "embedding_params": total - non_embedding,
        "non_embedding_params": non_embedding,
        "seq": seq,
        "batch": config.batch,
        "flops_per_token_forward": train_flops / 3,
        "flops_per_token_training": train_flops,
        "weights_bytes": weight_bytes,
        "gradients_bytes": weight_bytes,
        "optimizer_bytes": optimizer_bytes(model, config.optimizer),
        "activations_bytes": activation_bytes(model_config, config.batch, seq, config.recompute),
        "logits_bytes": logits,
    }


def _size(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _bytes(n: float) -> str:
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"


def format_description(d: dict, config: DescribeConfig) -> str:
    total_memory = sum(
        d[k] for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes")
    )
    rows = [
        ("parameters", _size(d["params"]), f"{d['params']:,}"),
        ("  embedding", _size(d["embedding_params"]), "token/position/type tables"),
        ("  non-embedding", _size(d["non_embedding_params"]), "Kaplan et al. 2020's N"),
        ("FLOPs/token forward", _size(d["flops_per_token_forward"]), "2N + 4*L*H*Dh*T"),
        (
            "FLOPs/token training",
            _size(d["flops_per_token_training"]),
            f"6N + 12*L*H*Dh*T (PaLM App. B), N = matmul weights, T = {d['seq']}",
        ),
        ("weights", _bytes(d["weights_bytes"]), config.dtype),
        ("gradients", _bytes(d["gradients_bytes"]), config.dtype),
        (
            "optimizer states",
            _bytes(d["optimizer_bytes"]),
            "AdamW m, v fp32" if config.optimizer == "adamw" else "AdamW m, v 8-bit block-wise",
        ),
        (
            "activations",
            _bytes(d["activations_bytes"]),
            f"b={d['batch']}, s={d['seq']}: L*sbh(34 + 5as/h), Korthikanti et al. 2022"
            + ("" if config.recompute == "none" else f", {config.recompute} recomputation"),
        ),
        ("  + logits", _bytes(d["logits_bytes"]), "fp32 (B, T, vocab), if not chunked"),
        ("total (training)", _bytes(total_memory), "weights + gradients + optimizer + activations"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{d['recipe']} ({d['arch']})", ""]
    lines += [f"{name:<{width}}  {value:>12}  {note}" for name, value, note in rows]
    return "\n".join(lines)


def describe_command(config: DescribeConfig) -> dict:
    if not config.recipe:
        raise ConfigError("give a recipe: lmforge model describe NAME|FILE.yaml|MODEL_DIR")
    d = describe(config)
    print(format_description(d, config))
    return d
