"""Adaptation (seed 002 §5): instruction tuning data and parameter-efficient tuning."""

from lmforge.adapt.instruct import (
    Example,
    SFTData,
    encode_examples,
    mix,
    pack_batch,
    pad_batch,
    read_examples,
    sft_loss,
)
from lmforge.adapt.peft import (
    PeftConfig,
    add_adapter,
    disabled_adapters,
    load_adapter,
    merge_lora,
    remove_adapter,
    save_adapter,
    set_adapter,
    unmerge_lora,
)

__all__ = [
    "Example",
    "PeftConfig",
    "SFTData",
    "add_adapter",
    "disabled_adapters",
    "encode_examples",
    "load_adapter",
    "merge_lora",
    "mix",
    "pack_batch",
    "pad_batch",
    "read_examples",
    "remove_adapter",
    "save_adapter",
    "set_adapter",
    "sft_loss",
    "unmerge_lora",
]
