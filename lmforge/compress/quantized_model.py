"""Quantize a Transformer's linear layers in place, and save / load quantized checkpoints.

A quantized checkpoint is an ordinary checkpoint directory (config.yaml, model.safetensors with
the integer codes and scales under the layers' names, tokenizer.json) plus `quantization.yaml`
naming the method, bits and group size and which layers were replaced; `lmforge.load` sees that
file and rebuilds the quantized modules before loading the tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.compress.calibration import blockwise, record_inputs
from lmforge.compress.gptq import HessianAccumulator, gptq_quantize
from lmforge.compress.llm_int8 import DEFAULT_THRESHOLD, LLMInt8Linear
from lmforge.compress.nf4 import BLOCK as NF4_BLOCK
from lmforge.compress.nf4 import NF4Linear
from lmforge.compress.qlinear import QuantizedLinear
from lmforge.compress.quantize import check_group_size
from lmforge.compress.smoothquant import DEFAULT_ALPHA, W8A8Linear, smoothing_factors
from lmforge.errors import CheckpointError, ConfigError

Method = Literal["rtn", "gptq", "nf4", "llm_int8", "smoothquant", "w8a8"]
METHODS = ("rtn", "gptq", "nf4", "llm_int8", "smoothquant", "w8a8")
BITS = {
    "rtn": (8, 4),
    "gptq": (8, 4),
    "nf4": (4,),
    "llm_int8": (8,),
    "smoothquant": (8,),
    "w8a8": (8,),
}
CALIBRATED = ("gptq", "smoothquant")
QUANT_FILE = "quantization.yaml"
QUANTIZED_TYPES = (QuantizedLinear, NF4Linear, LLMInt8Linear, W8A8Linear)


@dataclass
class QuantizationSpec:
    """What quantization.yaml records: enough to rebuild the modules before loading tensors."""

    method: str
    bits: int
    group_size: int
    layers: list[str] = field(default_factory=list)
    act_order: bool = False
    alpha: float = DEFAULT_ALPHA
    threshold: float = DEFAULT_THRESHOLD


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED_TYPES) for m in model.modules())


def target_layers(model: nn.Module, keep_lm_head: bool) -> list[str]:
    """Every linear layer of the blocks, and the output layer unless kept in fp32. The token
    embedding stays fp32 in every case: a lookup reads one row per token, not the table."""
    names = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")
    ]
    return names if keep_lm_head else [*names, "lm_head"]


def _check(method: str, bits: int, group_size: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if bits not in BITS[method]:
        raise ConfigError(f"method {method} supports bits {BITS[method]}, got {bits}")
    if group_size < 1:
        raise ConfigError(f"group_size must be positive, got {group_size}")


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def empty_module(spec: QuantizationSpec, linear: nn.Linear) -> nn.Module:
    """The quantized module for `linear`'s shape, with placeholder tensors (loading fills them)."""
    shape = dict(
        in_features=linear.in_features,
        out_features=linear.out_features,
        bias=linear.bias is not None,
    )
    if spec.method in ("rtn", "gptq"):
        gs = spec.group_size if spec.bits == 4 else linear.in_features
        return QuantizedLinear(**shape, bits=spec.bits, group_size=gs)
    if spec.method == "nf4":
        return NF4Linear(**shape)
    if spec.method == "llm_int8":
        return LLMInt8Linear(**shape, threshold=spec.threshold)
    return W8A8Linear(**shape)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: Method = "rtn",
    bits: int = 8,
    group_size: int = 128,
    *,
    keep_lm_head: bool = False,
    calibration: torch.Tensor | None = None,
    act_order: bool = False,
    alpha: float = DEFAULT_ALPHA,
    threshold: float = DEFAULT_THRESHOLD,
) -> nn.Module:
    """Replace the model's linear layers by quantized ones, in place; returns the model.

    rtn/gptq: weight-only, int8 per channel or int4 per group of `group_size` inputs; nf4:
    NF4 blocks of 64; llm_int8 and w8a8/smoothquant: 8 bits. gptq and smoothquant need
    `calibration` token ids (n_samples, seq_len), e.g. from calibration.calibration_tokens."""
    _check(method, bits, group_size)
    if is_quantized(model):
        raise ConfigError("the model is already quantized; quantize its fp32 original instead")
    names = target_layers(model, keep_lm_head)
    for n in names:  # fail before any layer is replaced
        in_features = model.get_submodule(n).in_features
        if bits == 4 and method in ("rtn", "gptq"):
            check_group_size(in_features, group_size, n)
        elif method == "nf4":
            check_group_size(in_features, NF4_BLOCK, f"{n} (NF4 blocks)")
    if method in CALIBRATED and (calibration is None or calibration.numel() == 0):
        raise ConfigError(f"method {method} needs calibration token ids")
    spec = QuantizationSpec(method, bits, group_size, names, act_order, alpha, threshold)
    if method == "gptq":
        _gptq(model, calibration, spec)
    elif method == "smoothquant":
        _smoothquant(model, calibration, spec)
    else:
        for n in names:
            linear = model.get_submodule(n)
            if method == "rtn":
                _set(model, n, QuantizedLinear.from_linear(linear, bits, group_size))
            elif method == "nf4":
                _set(model, n, NF4Linear.from_linear(linear))
            elif method == "llm_int8":
                _set(model, n, LLMInt8Linear.from_linear(linear, threshold))
            else:
                _set(model, n, W8A8Linear.from_linear(linear))
    model.quantization = spec
    return model


def _gptq(model: nn.Module, ids: torch.Tensor, spec: QuantizationSpec) -> None:
    def visit(prefix, layers, run):
        hessians = {
            n: HessianAccumulator(m.in_features, m.weight.device) for n, m in layers.items()
        }
        handles = record_inputs(layers, lambda n, x: hessians[n].add(x))
        run()
        for h in handles:
            h.remove()
        for n, linear in layers.items():
            gs = spec.group_size if spec.bits == 4 else linear.in_features
            codes, scale, zero = gptq_quantize(
                linear.weight,
                hessians[n].H,
                bits=spec.bits,
                group_size=gs,
                symmetric=spec.bits == 8,
                act_order=spec.act_order,
            )
            layer = empty_module(spec, linear).to(linear.weight.device)
            layer.set_codes(codes, scale, zero if spec.bits == 4 else None)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            _set(model, n, layer)

    blockwise(model, ids, set(spec.layers), visit)


def _smoothquant(model: nn.Module, ids: torch.Tensor, spec: QuantizationSpec) -> None:
    def visit(prefix, layers, run):
        absmax = {n: torch.zeros(m.in_features, device=m.weight.device) for n, m in layers.items()}

        def record(n, x):
            torch.maximum(
                absmax[n], x.detach().abs().reshape(-1, x.shape[-1]).amax(0), out=absmax[n]
            )

        handles = record_inputs(layers, record)
        run()
        for h in handles:
            h.remove()
        for n, linear in layers.items():
            s = smoothing_factors(absmax[n], linear.weight, spec.alpha)
            _set(model, n, W8A8Linear.from_linear(linear, s))

    blockwise(model, ids, set(spec.layers), visit)


def save_quantized(model: nn.Module, path: str | Path, *, tokenizer=None) -> Path:
    """Write a quantized checkpoint directory atomically (see the module docstring)."""
    from lmforge.config import to_dict
    from lmforge.train.checkpoint import write_atomically

    spec = getattr(model, "quantization", None)
    if spec is None:
        raise ConfigError("the model is not quantized: call quantize_model first")
    # The output layer, when quantized, has its own tensors: only an fp32 tied one is dropped.
    tied = model.config.tie_embeddings and "lm_head" not in spec.layers
    tensors = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }

    def write(tmp: Path) -> None:
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(model.config), sort_keys=False))
        (tmp / QUANT_FILE).write_text(yaml.safe_dump(asdict(spec), sort_keys=False))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)

    return write_atomically(path, write)


def read_spec(path: str | Path) -> QuantizationSpec:
    file = Path(path) / QUANT_FILE
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
        spec = QuantizationSpec(**data)
    except (OSError, yaml.YAMLError, TypeError) as e:
        raise CheckpointError(f"{file} is not a valid quantization record: {e}") from None
    try:
        _check(spec.method, spec.bits, spec.group_size)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None
    return spec


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """A quantized checkpoint directory as a model in eval mode, its layers quantized as saved."""
    from lmforge.model import Transformer
    from lmforge.train.checkpoint import read_model_config

    path = Path(path)
    config, spec = read_model_config(path), read_spec(path)
    try:
        tensors = load_file(str(path / "model.safetensors"), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'model.safetensors'} is missing or corrupt: {e}") from None
    with torch.device("meta"):
        model = Transformer(config)
        for n in spec.layers:
            _set(model, n, empty_module(spec, model.get_submodule(n)))
    expected = set(model.state_dict())
    if config.tie_embeddings and "lm_head" not in spec.layers:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config and {QUANT_FILE}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_embeddings and "lm_head" not in spec.layers:
        model.lm_head.weight = model.embed.weight
    if model.rope is not None:  # non-persistent buffers are not in the file: recompute them
        model.rope.to_empty(device=device)
        model.rope.reset_tables()
    model.quantization = spec
    return model.eval()
