"""LoRA adapters in Hugging Face PEFT's format: adapter_config.json + adapter_model.safetensors.

PEFT names the update of each projection of the Hugging Face model, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (r, d_in) and `...lora_B.weight`
(d_out, r). lmforge's q/k/v and gate/up LoRA pairs act on row slices of the fused attn.qkv and
mlp.w_in, so each maps 1:1 onto PEFT's q_proj/k_proj/v_proj and gate_proj/up_proj pair.
Only the Llama family (llama/mistral/qwen2 exports) is supported: GPT-2's fused c_attn takes one
LoRA pair for all of q, k and v, which lmforge's per-slice LoRA cannot represent exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.adapt.peft import (
    LoRAAdapter,
    LoRAConfig,
    PeftConfig,
    _lora,
    add_adapter,
    lora_candidates,
)
from lmforge.errors import CheckpointError, ConfigError
from lmforge.interop.hf import LLAMA_FAMILY, hf_family
from lmforge.train.checkpoint import write_atomically

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# lmforge LoRA target (last name part) -> the Hugging Face module inside one layer.
TO_HF = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "out": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
    "w_out": "mlp.down_proj",
}  # fmt: skip
FROM_HF = {v: k for k, v in TO_HF.items()}
PARENT = {"q": "attn", "k": "attn", "v": "attn", "out": "attn", "gate": "mlp", "up": "mlp",
          "w_out": "mlp"}  # fmt: skip
KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


def _check_family(model: nn.Module) -> None:
    family = hf_family(model.config)
    if family not in LLAMA_FAMILY:
        raise ConfigError(
            f"PEFT adapters are supported for the Llama family ({', '.join(LLAMA_FAMILY)}), "
            f"not {family}"
        )


def export_peft(
    model: nn.Module, out_dir: str | Path, name: str | None = None, *, base_model: str = ""
) -> Path:
    """Write LoRA adapter `name` (default: the active one) of `model` in PEFT's format, for the
    Hugging Face export of the same base (`base_model`: its path or hub name, for the config)."""
    _check_family(model)
    adapter: LoRAAdapter = _lora(model, name)
    cfg: LoRAConfig = model.peft.configs[name or model.peft.active].lora
    weights, targets = {}, set()
    for key, layer in adapter.layers.items():
        block = int(key.split("/")[1])
        for part in layer.slices:
            hf = TO_HF[part]
            targets.add(hf.split(".")[-1])
            prefix = f"base_model.model.model.layers.{block}.{hf}"
            weights[f"{prefix}.lora_A.weight"] = layer.A[part].detach().contiguous()
            weights[f"{prefix}.lora_B.weight"] = layer.B[part].detach().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})

    return write_atomically(out_dir, write)


def import_peft(model: nn.Module, adapter_dir: str | Path, name: str = "default") -> nn.Module:
    """Put a PEFT LoRA adapter (saved by PEFT's save_pretrained or export_peft) onto `model`,
    an lmforge model of the same Llama-family base, as adapter `name` and activate it."""
    _check_family(model)
    adapter_dir = Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(adapter_dir / WEIGHTS_FILE))
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{adapter_dir} is not a PEFT adapter: {e.filename} is missing"
        ) from None
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"cannot read the PEFT adapter in {adapter_dir}: {e}") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{adapter_dir}: only LoRA adapters import, not {config.get('peft_type')}"
        )
    unsupported = {
        "rank_pattern": config.get("rank_pattern"),
        "alpha_pattern": config.get("alpha_pattern"),
        "use_dora": config.get("use_dora"),
        "modules_to_save": config.get("modules_to_save"),
        "layers_to_transform": config.get("layers_to_transform"),
    }
    if bad := {k: v for k, v in unsupported.items() if v}:
        raise CheckpointError(f"{adapter_dir}: unsupported PEFT LoRA settings {bad}")
    if config.get("bias", "none") != "none":
        raise CheckpointError(
            f"{adapter_dir}: LoRA bias training ({config['bias']}) is not supported"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        m = KEY.fullmatch(key)
        if not m or m[2] not in FROM_HF:
            raise CheckpointError(f"{adapter_dir}: unexpected tensor {key}")
        part = FROM_HF[m[2]]
        pairs.setdefault(f"blocks.{m[1]}.{PARENT[part]}.{part}", {})[m[3]] = tensor
    r = int(config["r"])
    lora = LoRAConfig(
        r=r,
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=sorted(pairs),
        rslora=bool(config.get("use_rslora")),
    )
    adapter = add_adapter(model, PeftConfig(method="lora", lora=lora), name)
    candidates = lora_candidates(model)
    with torch.no_grad():
        for target, ab in pairs.items():
            part = target.rsplit(".", 1)[1]
            layer = adapter.layers[candidates[target][0].replace(".", "/")]
            for side, param in (("A", layer.A[part]), ("B", layer.B[part])):
                if side not in ab or ab[side].shape != param.shape:
                    raise CheckpointError(
                        f"{adapter_dir}: lora_{side} of {target} has shape "
                        f"{tuple(ab[side].shape) if side in ab else None}, the model needs "
                        f"{tuple(param.shape)}"
                    )
                param.copy_(ab[side].to(param.dtype))
    return adapter
