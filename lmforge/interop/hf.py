"""Hugging Face checkpoints (config.json + safetensors) in and out: Llama, Mistral, Qwen2, GPT-2.

Names map one to one onto lmforge's except that lmforge fuses q/k/v into `attn.qkv` and the SwiGLU
gate/up projections into `mlp.w_in` (one matmul each), and GPT-2's Conv1D stores (in, out).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmforge.config import from_dict
from lmforge.errors import CheckpointError, ConfigError
from lmforge.loading import load, load_tokenizer, resolve
from lmforge.model import ModelConfig, Transformer
from lmforge.train.checkpoint import (
    model_from_weights,
    model_state_dict,
    save_model,
    write_atomically,
)

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = (*LLAMA_FAMILY, "gpt2")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
INDEX_FILE, BIN_FILE = "model.safetensors.index.json", "pytorch_model.bin"

# HF module names inside one layer -> lmforge names inside one block. q/k/v and gate/up get
# temporary names here and are fused afterwards.
LLAMA_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.out",
    "post_attention_layernorm": "mlp_norm",
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.w_out",
}
LLAMA_TOP = {"embed_tokens": "embed", "norm": "norm", "lm_head": "lm_head"}
GPT2_LAYER = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn.qkv",
    "attn.c_proj": "attn.out",
    "ln_2": "mlp_norm",
    "mlp.c_fc": "mlp.w_in",
    "mlp.c_proj": "mlp.w_out",
}
GPT2_TOP = {"wte": "embed", "wpe": "pos_embed", "ln_f": "norm", "lm_head": "lm_head"}
GPT2_CONV1D = ("attn.qkv", "attn.out", "mlp.w_in", "mlp.w_out")
# Buffers some checkpoints carry that are not weights: causal masks and RoPE frequencies.
IGNORED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _need(hf: dict, key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"Hugging Face config of a {hf.get('model_type')} model lacks {key!r}")
    return hf[key]


def hf_to_model_config(hf: dict) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json; ConfigError for what lmforge cannot represent."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        return _gpt2_config(hf)
    if kind in LLAMA_FAMILY:
        return _llama_config(hf)
    raise ConfigError(
        f"unsupported Hugging Face model_type {kind!r}; supported: {', '.join(SUPPORTED)}"
    )


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    # transformers < 5 writes scaling as `rope_scaling` (with "type" in old files) beside
    # `rope_theta`; transformers 5 puts both in `rope_parameters`.
    for key in ("rope_scaling", "rope_parameters"):
        spec = hf.get(key) or {}
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise ConfigError(
                f"{key} of type {kind!r} is not supported: lmforge has plain RoPE only"
            )
        if spec.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{key}: partial_rotary_factor is not supported")
    return params.get("rope_theta", hf.get("rope_theta", 10000.0))


def _sliding_window(hf: dict) -> int | None:
    """The attention window some layer uses, or None when every layer attends to all positions."""
    kind = hf["model_type"]
    if kind == "mistral":
        return hf.get("sliding_window", 4096)  # MistralConfig's default
    if kind == "qwen2" and hf.get("use_sliding_window"):
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
            for i in range(hf["num_hidden_layers"])
        ]
        if "sliding_attention" in layer_types:
            return hf.get("sliding_window", 4096)
    return None


def _llama_config(hf: dict) -> ModelConfig:
    kind = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported for {kind}: only silu")
    max_len = _need(hf, "max_position_embeddings")
    window = _sliding_window(hf)
    if window is not None and window < max_len:
        raise ConfigError(
            f"{kind} sliding_window {window} < max_position_embeddings {max_len} is not supported"
        )
    if kind == "qwen2":
        attn_bias, out_bias, mlp_bias = True, False, False
    else:
        attn_bias = out_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
    # lmforge has one switch for the output projection and MLP biases; where HF has only one
    # of them, the other loads as zeros (see _fill_zero_biases).
    bias = out_bias or mlp_bias
    n_heads = _need(hf, "num_attention_heads")
    return from_dict(
        ModelConfig,
        dict(
            vocab_size=_need(hf, "vocab_size"),
            d_model=_need(hf, "hidden_size"),
            n_layers=_need(hf, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim"),
            d_ff=_need(hf, "intermediate_size"),
            max_seq_len=max_len,
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            position="rope",
            rope_theta=_rope_theta(hf),
            bias=bias,
            qkv_bias=None if attn_bias == bias else attn_bias,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
        ),
    )


def _gpt2_config(hf: dict) -> ModelConfig:
    for key in (
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "add_cross_attention",
    ):
        if hf.get(key):
            raise ConfigError(f"GPT-2 option {key}=true is not supported")
    if not hf.get("scale_attn_weights", True):
        raise ConfigError("GPT-2 option scale_attn_weights=false is not supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise ConfigError(f"GPT-2 activation_function {act!r} is not supported: gelu_new or gelu")
    d_model = _need(hf, "n_embd")
    return from_dict(
        ModelConfig,
        dict(
            vocab_size=_need(hf, "vocab_size"),
            d_model=d_model,
            n_layers=_need(hf, "n_layer"),
            n_heads=_need(hf, "n_head"),
            d_ff=hf.get("n_inner") or 4 * d_model,
            max_seq_len=_need(hf, "n_positions"),
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp=GPT2_ACTIVATIONS[act],
            position="learned",
            bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            init_std=hf.get("initializer_range", 0.02),
        ),
    )


def _rename(
    sd: dict[str, torch.Tensor], prefix: str, layer_re: str, layer: dict, top: dict
) -> dict[str, torch.Tensor]:
    """Rename HF tensors to lmforge names; unknown names are an error, not silently dropped."""
    out, unknown = {}, []
    for key, tensor in sd.items():
        if key.endswith(IGNORED):
            continue
        module, _, param = key.removeprefix(prefix).rpartition(".")
        m = re.fullmatch(layer_re, module)
        if m and m[2] in layer:
            out[f"blocks.{m[1]}.{layer[m[2]]}.{param}"] = tensor
        elif module in top:
            out[f"{top[module]}.{param}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected tensors in the Hugging Face checkpoint: {unknown[:5]}")
    return out


def _fuse(out: dict[str, torch.Tensor], block: str, fused: str, parts: tuple[str, ...]) -> None:
    for param in ("weight", "bias"):
        tensors = [out.pop(f"{block}.{p}.{param}", None) for p in parts]
        present = [t for t in tensors if t is not None]
        if len(present) == len(parts):
            out[f"{block}.{fused}.{param}"] = torch.cat(present)
        elif present:
            raise CheckpointError(f"{block}: some of {parts} lack their {param}")


def _fill_zero_biases(out: dict[str, torch.Tensor], hf: dict, config: ModelConfig) -> None:
    if not config.bias or hf["model_type"] == "qwen2":
        return
    dtype = out["embed.weight"].dtype
    missing = []
    if not hf.get("attention_bias", False):
        missing.append(("attn.out", config.d_model))
    if not hf.get("mlp_bias", False):
        missing += [("mlp.w_in", 2 * config.ff_dim), ("mlp.w_out", config.d_model)]
    for i in range(config.n_layers):
        for name, size in missing:
            out[f"blocks.{i}.{name}.bias"] = torch.zeros(size, dtype=dtype)


def hf_state_dict_to_lmforge(
    sd: dict[str, torch.Tensor], hf: dict, config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Map a Hugging Face state dict onto lmforge's names and layouts (views where possible)."""
    if hf.get("model_type") == "gpt2":
        out = _rename(sd, "transformer.", r"h\.(\d+)\.(.+)", GPT2_LAYER, GPT2_TOP)
        for i in range(config.n_layers):
            for name in GPT2_CONV1D:
                key = f"blocks.{i}.{name}.weight"
                if key in out:
                    out[key] = out[key].t()
    else:
        out = _rename(sd, "model.", r"layers\.(\d+)\.(.+)", LLAMA_LAYER, LLAMA_TOP)
        for i in range(config.n_layers):
            _fuse(out, f"blocks.{i}", "attn.qkv", ("attn.q", "attn.k", "attn.v"))
            _fuse(out, f"blocks.{i}", "mlp.w_in", ("mlp.gate", "mlp.up"))
        _fill_zero_biases(out, hf, config)
    head = out.pop("lm_head.weight", None)
    if not config.tie_embeddings:
        if head is not None:
            out["lm_head.weight"] = head
    elif head is not None and "embed.weight" in out and not torch.equal(head, out["embed.weight"]):
        raise CheckpointError(
            "tie_word_embeddings is set but lm_head.weight differs from the token embeddings"
        )
    return out


def hf_family(config: ModelConfig) -> str:
    """The HF model_type that represents `config` exactly; ConfigError when none does."""
    if (config.position, config.norm, config.mlp) == ("rope", "rmsnorm", "swiglu"):
        return "qwen2" if config.has_qkv_bias and not config.bias else "llama"
    if (
        (config.position, config.norm) == ("learned", "layernorm")
        and config.mlp in ("gelu", "gelu_tanh")
        and config.bias
        and config.has_qkv_bias
        and config.kv_heads == config.n_heads
        and config.dim_head * config.n_heads == config.d_model
    ):
        return "gpt2"
    raise ConfigError(
        f"no Hugging Face model family matches position={config.position}, norm={config.norm}, "
        f"mlp={config.mlp}, bias={config.bias}, qkv_bias={config.has_qkv_bias}: exportable are "
        "llama/qwen2 (rope + rmsnorm + swiglu) and gpt2 (learned + layernorm + gelu + biases, MHA)"
    )


def lmforge_to_hf_state_dict(model: Transformer) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json contents, HF state dict) for `model`; tied output weights stored once."""
    c = model.config
    family = hf_family(c)
    sd = model_state_dict(model)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std,
        "torch_dtype": str(sd["embed.weight"].dtype).removeprefix("torch."),
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if family == "gpt2":
        hf.update(
            n_embd=c.d_model,
            n_layer=c.n_layers,
            n_head=c.n_heads,
            n_inner=c.ff_dim,
            n_positions=c.max_seq_len,
            activation_function="gelu_new" if c.mlp == "gelu_tanh" else "gelu",
            layer_norm_epsilon=c.norm_eps,
            resid_pdrop=c.dropout,
            embd_pdrop=c.dropout,
            attn_pdrop=c.dropout,
        )
        return hf, _gpt2_state_dict(sd)
    hf.update(
        hidden_size=c.d_model,
        intermediate_size=c.ff_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.kv_heads,
        head_dim=c.dim_head,
        hidden_act="silu",
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        # rope_theta for transformers < 5, rope_parameters for 5.
        rope_theta=c.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
    )
    if family == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layers)
    else:
        # HF Llama biases all of q/k/v/o or none: a lone output-projection bias needs zero
        # q/k/v biases beside it.
        hf.update(attention_bias=c.has_qkv_bias or c.bias, mlp_bias=c.bias)
    return hf, _llama_state_dict(sd, c)


def _gpt2_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inverse = {v: k for k, v in GPT2_LAYER.items()}
    top = {v: k for k, v in GPT2_TOP.items()}
    out = {}
    for name, tensor in sd.items():
        module, _, param = name.rpartition(".")
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
        if m:
            if m[2] in GPT2_CONV1D and param == "weight":
                tensor = tensor.t().contiguous()
            out[f"transformer.h.{m[1]}.{inverse[m[2]]}.{param}"] = tensor
        elif module == "lm_head":
            out[name] = tensor
        else:
            out[f"transformer.{top[module]}.{param}"] = tensor
    return out


def _llama_state_dict(sd: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    inverse = {v: k for k, v in LLAMA_LAYER.items()}
    top = {v: k for k, v in LLAMA_TOP.items()}
    qkv_sizes = [c.n_heads * c.dim_head, c.kv_heads * c.dim_head, c.kv_heads * c.dim_head]
    out = {}
    for name, tensor in sd.items():
        module, _, param = name.rpartition(".")
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
        if not m:
            out[name if module == "lm_head" else f"model.{top[module]}.{param}"] = tensor
            continue
        prefix = f"model.layers.{m[1]}."
        # Splits along dim 0 are contiguous, non-overlapping views: safetensors saves them
        # without copies.
        if m[2] == "attn.qkv":
            parts = dict(zip(("attn.q", "attn.k", "attn.v"), tensor.split(qkv_sizes), strict=True))
        elif m[2] == "mlp.w_in":
            parts = dict(zip(("mlp.gate", "mlp.up"), tensor.chunk(2), strict=True))
        else:
            parts = {m[2]: tensor}
        for part, t in parts.items():
            out[f"{prefix}{inverse[part]}.{param}"] = t
    if c.bias and not c.has_qkv_bias:
        for i in range(c.n_layers):
            for part, size in zip(("q_proj", "k_proj", "v_proj"), qkv_sizes, strict=True):
                out[f"model.layers.{i}.self_attn.{part}.bias"] = torch.zeros(
                    size, dtype=sd["embed.weight"].dtype
                )
    return out


def read_hf_config(path: str | Path) -> dict:
    """The parsed config.json of a Hugging Face directory; CheckpointError if missing or bad."""
    file = Path(path) / CONFIG_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{file.parent} is not a Hugging Face model: no {CONFIG_FILE}"
        ) from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is truncated or corrupt: {e}") from None


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid index: {e}") from None
    return [path / name for name in sorted(set(weight_map.values()))]


def read_hf_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, source description) from model.safetensors, its shards or pytorch_model.bin."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return _load_safetensors(path / WEIGHTS_FILE), str(path / WEIGHTS_FILE)
    if (path / INDEX_FILE).is_file():
        sd = {}
        for file in _shard_files(path):
            sd.update(_load_safetensors(file))
        return sd, str(path / INDEX_FILE)
    file = path / BIN_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{path} has no weights: no {WEIGHTS_FILE}, {INDEX_FILE} or {BIN_FILE}"
        )
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is truncated or corrupt: {e}") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file} does not hold a state dict")
    return sd, str(file)


def load_hf(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """A Transformer in eval mode from a Hugging Face directory; fp32 unless `dtype` is given."""
    hf = read_hf_config(path)
    config = hf_to_model_config(hf)
    sd, source = read_hf_weights(path)
    model = model_from_weights(
        config,
        hf_state_dict_to_lmforge(sd, hf, config),
        source=source,
        device=device,
        dtype=dtype or torch.float32,
    )
    return model.eval()


def _write_weights(sd: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """One model.safetensors, or shards plus the index transformers reads when over the limit."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in sd.items():
        n = tensor.numel() * tensor.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if len(shards) == 1:
        save_file(sd, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: sd[n] for n in names}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def export_hf(
    model: Transformer,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face directory, atomically; return its path."""
    hf, sd = lmforge_to_hf_state_dict(model)
    if tokenizer is not None:
        hf.update(
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        _write_weights(sd, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)

    return write_atomically(out_dir, write)


def _saved_dtype(directory: Path) -> torch.dtype | None:
    """The dtype of the first tensor in a directory's safetensors weights, read from the header."""
    file = directory / WEIGHTS_FILE
    if not file.is_file():
        if not (directory / INDEX_FILE).is_file():
            return None
        file = _shard_files(directory)[0]
    try:
        with safe_open(str(file), framework="pt") as f:
            dtype = f.get_slice(next(iter(f.keys())))[:1].dtype
    except (SafetensorError, OSError, StopIteration):
        return None
    return dtype if dtype.is_floating_point else None


def convert(src: str | Path, dst: str | Path, *, to: str) -> Path:
    """Convert any model `lmforge.load` reads (GGUF files included) to an lmforge checkpoint
    (to="lmforge") or a Hugging Face directory (to="hf"), keeping the stored dtype and the
    tokenizer."""
    if to not in ("lmforge", "hf"):
        raise ConfigError(f"convert: unknown target {to!r}; choose 'lmforge' or 'hf'")
    kind, directory = resolve(src)
    # GGUF weights are dequantized to float32; directories keep the dtype they were saved in.
    model = load(src, dtype=None if kind == "gguf" else _saved_dtype(directory))
    tokenizer = None
    if kind == "gguf" or (directory / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(src)
    if to == "hf":
        return export_hf(model, dst, tokenizer=tokenizer)
    return save_model(model, dst, tokenizer=tokenizer)
