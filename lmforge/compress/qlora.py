"""QLoRA (Dettmers et al. 2023): LoRA trained over a frozen base stored in NF4.

The base's linear layers are quantized to NF4 with double-quantized scales (lmforge.compress.nf4,
~4.13 bits per weight instead of 32) and frozen; LoRA's A and B (lmforge.adapt.peft) stay in
full precision and are the only trainable tensors. In the forward pass and for the input
gradient the NF4 weight is dequantized a block of rows at a time (NF4Linear), so no fp32 copy
of a base weight is ever held; the gradient reaches A and B through the full-precision LoRA
path, exactly as over an fp32 base whose weights are the dequantized NF4 ones.

The token embedding and the output layer stay fp32, as in the paper (which quantizes only the
transformer's linear layers): the loss reads `model.lm_head.weight` directly
(lmforge.train.objectives), and a lookup table gains nothing from a matmul-oriented format.
"""

from __future__ import annotations

from torch import nn

from lmforge.adapt.peft import LoRAConfig, PeftConfig, add_adapter
from lmforge.compress.quantized_model import is_quantized, quantize_model
from lmforge.errors import ConfigError


def quantize_base_nf4(model: nn.Module) -> nn.Module:
    """Quantize the blocks' linear layers to NF4 in place (embedding and output layer stay
    fp32); a model already quantized that way (e.g. from load_quantized) is left as it is."""
    if not is_quantized(model):
        return quantize_model(model, "nf4", 4, keep_lm_head=True)
    spec = getattr(model, "quantization", None)
    if spec is None or spec.method != "nf4" or "lm_head" in spec.layers:
        how = (
            "NF4 including its output layer"
            if spec and spec.method == "nf4"
            else (spec.method if spec else "an unrecorded method")
        )
        raise ConfigError(
            f"QLoRA needs an NF4 base with an fp32 output layer (the loss reads its weight); "
            f"this model is quantized with {how}: start from the fp32 model instead"
        )
    return model


def prepare_qlora(
    model: nn.Module, lora: LoRAConfig | None = None, name: str = "default"
) -> nn.Module:
    """Make `model` a QLoRA model in place: NF4 base (quantize_base_nf4), frozen, with a LoRA
    adapter `name` on top (lmforge.adapt.peft.add_adapter), active. Returns the adapter, whose
    parameters are the only trainable ones. Train it as any LoRA model (the Trainer, sft);
    save it with save_adapter and the base with save_quantized."""
    quantize_base_nf4(model)
    return add_adapter(model, PeftConfig(method="lora", lora=lora or LoRAConfig()), name)
