"""`lmforge quantize`: quantize a model with one method and write a quantized checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.config import field_
from lmforge.errors import CheckpointError, ConfigError


@dataclass
class QuantizeConfig:
    """Quantize a model (RTN, GPTQ, NF4, LLM.int8(), SmoothQuant or naive W8A8) and save it."""

    model: str = field_("", "checkpoint, run, Hugging Face directory, GGUF file or 'smollm2'")
    method: Literal["rtn", "gptq", "nf4", "llm_int8", "smoothquant", "w8a8"] = field_(
        "rtn", "rtn|gptq (weight-only int8/int4), nf4, llm_int8, smoothquant|w8a8 (W8A8)"
    )
    bits: int = field_(8, "8, or 4 for rtn/gptq/nf4")
    group_size: int = field_(128, "inputs per int4 scale (rtn/gptq 4-bit); must divide them", ge=1)
    keep_lm_head: bool = field_(False, "keep the output layer in fp32")
    act_order: bool = field_(False, "gptq: quantize columns by decreasing Hessian diagonal")
    alpha: float = field_(0.5, "smoothquant migration strength", ge=0, le=1)
    threshold: float = field_(6.0, "llm_int8: inputs with |x| above this stay in fp32", gt=0)
    calibration: list[str] = field_(
        [], "gptq/smoothquant calibration corpus files (default: the shipped default corpus)"
    )
    calibration_samples: int = field_(32, "calibration sequences", ge=1)
    calibration_seq_len: int = field_(256, "tokens per calibration sequence", ge=1)
    out: str = field_("", "output checkpoint directory")


def quantize_command(config: QuantizeConfig):
    from lmforge.compress.calibration import calibration_tokens
    from lmforge.compress.quantized_model import CALIBRATED, quantize_model, save_quantized
    from lmforge.loading import load, load_tokenizer, resolve

    if not config.model or not config.out:
        raise ConfigError("give --model=PATH and --out=DIR")
    kind, directory = resolve(config.model)
    if kind == "lmforge" and (Path(directory) / "quantization.yaml").is_file():
        raise CheckpointError(
            f"{config.model} is already quantized; quantize its fp32 original instead"
        )
    model, tokenizer = load(config.model), load_tokenizer(config.model)
    calibration = None
    if config.method in CALIBRATED:
        texts = None
        if config.calibration:
            from lmforge.data.sources import iter_documents

            texts = (d["text"] for d in iter_documents(config.calibration))
        calibration = calibration_tokens(
            tokenizer, config.calibration_samples, config.calibration_seq_len, texts
        )
    start = time.perf_counter()
    quantize_model(
        model,
        config.method,
        config.bits,
        config.group_size,
        keep_lm_head=config.keep_lm_head,
        calibration=calibration,
        act_order=config.act_order,
        alpha=config.alpha,
        threshold=config.threshold,
    )
    seconds = time.perf_counter() - start
    out = save_quantized(model, config.out, tokenizer=tokenizer)
    size = (out / "model.safetensors").stat().st_size
    print(
        f"{config.method} {config.bits}-bit: {len(model.quantization.layers)} layers quantized "
        f"in {seconds:.1f} s; {size / 1e6:.1f} MB written to {out}"
    )
    return out
