"""Hugging Face checkpoints (config.json + safetensors) in and out: Llama, Mistral, Qwen2, GPT-2,
BLOOM, BERT and T5.

Names map one to one onto lmforge's except that lmforge fuses q/k/v into `attn.qkv` (k/v into
`cross_attn.kv`) and the gated MLP's gate/up projections into `mlp.w_in` (one matmul each),
GPT-2's Conv1D stores (in, out), and BLOOM interleaves q/k/v per head.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmforge.config import from_dict
from lmforge.errors import CheckpointError, ConfigError
from lmforge.loading import load, load_tokenizer, resolve
from lmforge.model import ModelConfig, Transformer
from lmforge.model.config import PLAIN
from lmforge.train.checkpoint import (
    model_from_weights,
    model_state_dict,
    save_model,
    write_atomically,
)

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = (*LLAMA_FAMILY, "gpt2", "bloom", "bert", "t5")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bloom": "BloomForCausalLM",
    "bert": "BertForPreTraining",
    "t5": "T5ForConditionalGeneration",
}
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
BERT_ACTIVATIONS = {**GPT2_ACTIVATIONS, "relu": "relu"}
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
    if kind in ("bloom", "bert", "t5"):
        return {"bloom": _bloom_config, "bert": _bert_config, "t5": _t5_config}[kind](hf)
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
            if "full_attention" in layer_types:
                raise ConfigError(
                    "qwen2 with sliding_window attention in some layers only (max_window_layers) "
                    "is not supported: lmforge uses one attention pattern in every layer"
                )
            return hf.get("sliding_window", 4096)
    return None


def _llama_config(hf: dict) -> ModelConfig:
    kind = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported for {kind}: only silu")
    max_len = _need(hf, "max_position_embeddings")
    window = _sliding_window(hf)
    # A window as long as the sequence is full attention (Mistral: keys with i - j < window).
    sliding = window is not None and window < max_len
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
            attention="sliding" if sliding else "full",
            window=window if sliding else None,
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


def _bloom_config(hf: dict) -> ModelConfig:
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ConfigError(
            "BLOOM option apply_residual_connection_post_layernorm=true is not supported"
        )
    d_model = _need(hf, "hidden_size")
    return from_dict(
        ModelConfig,
        dict(
            vocab_size=_need(hf, "vocab_size"),
            d_model=d_model,
            n_layers=_need(hf, "n_layer"),
            n_heads=_need(hf, "n_head"),
            d_ff=4 * d_model,
            # ALiBi has no position table; BLOOM trained on 2048-token sequences.
            max_seq_len=hf.get("seq_length") or 2048,
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            embed_norm=True,
            mlp="gelu_tanh",
            position="alibi",
            bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            init_std=hf.get("initializer_range", 0.02),
        ),
    )


def _bert_config(hf: dict) -> ModelConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(
            f"BERT position_embedding_type {hf['position_embedding_type']!r} is not supported"
        )
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ConfigError("BERT as a decoder (is_decoder/add_cross_attention) is not supported")
    act = hf.get("hidden_act", "gelu")
    if act not in BERT_ACTIVATIONS:
        raise ConfigError(f"BERT hidden_act {act!r} is not supported: gelu, gelu_new or relu")
    return from_dict(
        ModelConfig,
        dict(
            arch="encoder",
            vocab_size=_need(hf, "vocab_size"),
            d_model=_need(hf, "hidden_size"),
            n_layers=_need(hf, "num_hidden_layers"),
            n_heads=_need(hf, "num_attention_heads"),
            d_ff=_need(hf, "intermediate_size"),
            max_seq_len=hf.get("max_position_embeddings", 512),
            norm="layernorm",
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            norm_position="post",
            embed_norm=True,
            mlp=BERT_ACTIVATIONS[act],
            position="learned",
            type_vocab_size=hf.get("type_vocab_size", 2),
            nsp_head=bool(hf.get("_nsp_head", True)),
            bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            init_std=hf.get("initializer_range", 0.02),
        ),
    )


# T5 v1.1 and Flan-T5 say "gated-gelu", which transformers runs with the tanh GeLU ("gelu_new").
T5_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gated-silu": "swiglu",
    "gated-gelu": "geglu_tanh",
}


def _t5_config(hf: dict) -> ModelConfig:
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in T5_ACTIVATIONS:
        raise ConfigError(
            f"T5 feed_forward_proj {proj!r} is not supported: relu, gelu, gated-silu or gated-gelu"
        )
    d_model = _need(hf, "d_model")
    # transformers >= 5 writes scale_decoder_outputs; older files say it by tying the output
    # layer (T5 1.0 scales the decoder output by d_model^-0.5 before the tied layer, 1.1 not).
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    return from_dict(
        ModelConfig,
        dict(
            arch="encoder_decoder",
            vocab_size=_need(hf, "vocab_size"),
            d_model=d_model,
            n_layers=_need(hf, "num_layers"),
            n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
            n_heads=_need(hf, "num_heads"),
            head_dim=_need(hf, "d_kv"),
            d_ff=_need(hf, "d_ff"),
            max_seq_len=hf.get("n_positions") or 512,
            norm="rmsnorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-6),
            mlp=T5_ACTIVATIONS[proj],
            position="t5_bias",
            t5_num_buckets=hf.get("relative_attention_num_buckets", 32),
            t5_max_distance=hf.get("relative_attention_max_distance", 128),
            # T5 folds 1/sqrt(d) into its init: scores are plain q.k (Raffel et al. 2020).
            attn_scale=1.0,
            output_scale=d_model**-0.5 if scale else 1.0,
            bias=False,
            tie_embeddings=bool(hf.get("_tied", True)),
            init_std=hf.get("initializer_factor", 1.0) * d_model**-0.5,
        ),
    )


# BLOOM, BERT and T5 module names as (HF, lmforge) templates; {i} is a layer index. One table
# serves both directions.
BLOOM_NAMES = [
    ("word_embeddings", "embed"),
    ("word_embeddings_layernorm", "embed_norm"),
    ("h.{i}.input_layernorm", "blocks.{i}.attn_norm"),
    ("h.{i}.self_attention.query_key_value", "blocks.{i}.attn.qkv"),
    ("h.{i}.self_attention.dense", "blocks.{i}.attn.out"),
    ("h.{i}.post_attention_layernorm", "blocks.{i}.mlp_norm"),
    ("h.{i}.mlp.dense_h_to_4h", "blocks.{i}.mlp.w_in"),
    ("h.{i}.mlp.dense_4h_to_h", "blocks.{i}.mlp.w_out"),
    ("ln_f", "norm"),
]
BERT_NAMES = [
    ("embeddings.word_embeddings", "embed"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.token_type_embeddings", "type_embed"),
    ("embeddings.LayerNorm", "embed_norm"),
    ("encoder.layer.{i}.attention.self.query", "blocks.{i}.attn.q"),
    ("encoder.layer.{i}.attention.self.key", "blocks.{i}.attn.k"),
    ("encoder.layer.{i}.attention.self.value", "blocks.{i}.attn.v"),
    ("encoder.layer.{i}.attention.output.dense", "blocks.{i}.attn.out"),
    ("encoder.layer.{i}.attention.output.LayerNorm", "blocks.{i}.attn_norm"),
    ("encoder.layer.{i}.intermediate.dense", "blocks.{i}.mlp.w_in"),
    ("encoder.layer.{i}.output.dense", "blocks.{i}.mlp.w_out"),
    ("encoder.layer.{i}.output.LayerNorm", "blocks.{i}.mlp_norm"),
    ("pooler.dense", "nsp_head.pooler"),
]
BERT_HEAD_NAMES = [
    ("cls.predictions.transform.dense", "mlm_transform.dense"),
    ("cls.predictions.transform.LayerNorm", "mlm_transform.norm"),
    ("cls.seq_relationship", "nsp_head.classifier"),
]
_T5_LAYER = [
    ("layer.0.SelfAttention.q", "attn.q"),
    ("layer.0.SelfAttention.k", "attn.k"),
    ("layer.0.SelfAttention.v", "attn.v"),
    ("layer.0.SelfAttention.o", "attn.out"),
    ("layer.0.layer_norm", "attn_norm"),
]
_T5_MLP = [
    ("DenseReluDense.wi", "mlp.w_in"),
    ("DenseReluDense.wi_0", "mlp.gate"),
    ("DenseReluDense.wi_1", "mlp.up"),
    ("DenseReluDense.wo", "mlp.w_out"),
    ("layer_norm", "mlp_norm"),
]
T5_NAMES = [
    ("shared", "embed"),
    ("lm_head", "lm_head"),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias", "encoder_rel_bias.embed"),
    ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias", "rel_bias.embed"),
    ("encoder.final_layer_norm", "encoder_norm"),
    ("decoder.final_layer_norm", "norm"),
    *[(f"encoder.block.{{i}}.{a}", f"encoder_blocks.{{i}}.{b}") for a, b in _T5_LAYER],
    *[(f"encoder.block.{{i}}.layer.1.{a}", f"encoder_blocks.{{i}}.{b}") for a, b in _T5_MLP],
    *[(f"decoder.block.{{i}}.{a}", f"blocks.{{i}}.{b}") for a, b in _T5_LAYER],
    ("decoder.block.{i}.layer.1.EncDecAttention.q", "blocks.{i}.cross_attn.q"),
    ("decoder.block.{i}.layer.1.EncDecAttention.k", "blocks.{i}.cross_attn.k"),
    ("decoder.block.{i}.layer.1.EncDecAttention.v", "blocks.{i}.cross_attn.v"),
    ("decoder.block.{i}.layer.1.EncDecAttention.o", "blocks.{i}.cross_attn.out"),
    ("decoder.block.{i}.layer.1.layer_norm", "blocks.{i}.cross_norm"),
    *[(f"decoder.block.{{i}}.layer.2.{a}", f"blocks.{{i}}.{b}") for a, b in _T5_MLP],
]


def _template(t: str) -> re.Pattern:
    return re.compile(re.escape(t).replace(r"\{i\}", r"(?P<i>\d+)"))


def _translate(
    sd: dict[str, torch.Tensor], names: list[tuple[str, str]], *, to_hf: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename tensors by (HF, lmforge) module templates; also return the names none matched."""
    rules = [(_template(b if to_hf else a), a if to_hf else b) for a, b in names]
    out, unknown = {}, []
    for key, tensor in sd.items():
        module, _, param = key.rpartition(".")
        for pattern, target in rules:
            m = pattern.fullmatch(module)
            if m:
                out[f"{target.format(**m.groupdict())}.{param}"] = tensor
                break
        else:
            unknown.append(key)
    return out, unknown


def _split(out: dict[str, torch.Tensor], block: str, fused: str, parts: dict[str, int]) -> None:
    """Inverse of _fuse: `fused` rows split into `parts` (name -> rows), as views."""
    for param in ("weight", "bias"):
        tensor = out.pop(f"{block}.{fused}.{param}", None)
        if tensor is not None:
            for name, t in zip(parts, tensor.split(list(parts.values())), strict=True):
                out[f"{block}.{name}.{param}"] = t


def _bloom_qkv_order(config: ModelConfig) -> torch.Tensor:
    """Row order taking BLOOM's per-head [q_h, k_h, v_h] layout to lmforge's [q; k; v]."""
    H, D = config.n_heads, config.dim_head
    return torch.arange(3 * H * D).view(H, 3, D).transpose(0, 1).reshape(-1)


def _strict(unknown: list[str]) -> None:
    unknown = [k for k in unknown if not k.endswith(IGNORED)]
    if unknown:
        raise CheckpointError(f"unexpected tensors in the Hugging Face checkpoint: {unknown[:5]}")


def _fresh_head(config: ModelConfig, name: str, shape: tuple[int, ...], dtype) -> torch.Tensor:
    """An initial value for a head tensor the checkpoint lacks (as transformers does when a
    BertModel checkpoint is loaded into a model with heads): weights N(0, init_std), norm
    weights 1, biases 0."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name:
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, dtype=dtype) * config.init_std


def _bloom_from_hf(sd, config: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out, unknown = _translate(sd, [*BLOOM_NAMES, ("lm_head", "lm_head")])
    _strict(unknown)
    order = _bloom_qkv_order(config)
    for i in range(config.n_layers):
        for param in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{param}"
            out[key] = out[key][order]
    return out


def _bert_from_hf(sd, config: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    out, unknown = _translate(sd, BERT_NAMES + BERT_HEAD_NAMES)
    unknown = [k for k in unknown if not k.endswith("position_ids")]
    rest = {k: sd[k] for k in unknown}
    head, unknown = _translate(
        rest, [("cls.predictions.decoder", "lm_head"), ("cls.predictions", "lm_head")]
    )
    _strict(unknown)
    out.update(head)
    for i in range(config.n_layers):
        _fuse(out, f"blocks.{i}", "attn.qkv", ("attn.q", "attn.k", "attn.v"))
    d, dtype = config.d_model, out["embed.weight"].dtype
    heads = {
        "mlm_transform.dense.weight": (d, d),
        "mlm_transform.dense.bias": (d,),
        "mlm_transform.norm.weight": (d,),
        "mlm_transform.norm.bias": (d,),
        "lm_head.bias": (config.vocab_size,),
    }
    if config.nsp_head:
        heads.update({"nsp_head.classifier.weight": (2, d), "nsp_head.classifier.bias": (2,)})
    missing = [name for name in heads if name not in out]
    if missing:
        warnings.warn(
            f"the BERT checkpoint has no {', '.join(missing)}: newly initialized (a bare "
            "BertModel: hidden states are exact, MLM/NSP logits need training)",
            stacklevel=3,
        )
        for name in missing:
            out[name] = _fresh_head(config, name, heads[name], dtype)
    return out


def _t5_from_hf(sd, config: ModelConfig) -> dict[str, torch.Tensor]:
    shared = sd.get("shared.weight")
    for stack in ("encoder", "decoder"):
        embed = sd.get(f"{stack}.embed_tokens.weight")
        if embed is not None and shared is not None and not torch.equal(embed, shared):
            raise CheckpointError(f"{stack}.embed_tokens differs from shared: not supported")
    sd = {k: v for k, v in sd.items() if not k.endswith("embed_tokens.weight")}
    out, unknown = _translate(sd, T5_NAMES)
    _strict(unknown)
    for prefix, n in (("encoder_blocks", config.n_layers), ("blocks", config.decoder_layers)):
        for i in range(n):
            _fuse(out, f"{prefix}.{i}", "attn.qkv", ("attn.q", "attn.k", "attn.v"))
            _fuse(out, f"{prefix}.{i}", "mlp.w_in", ("mlp.gate", "mlp.up"))
        if prefix == "blocks":
            for i in range(n):
                _fuse(out, f"blocks.{i}", "cross_attn.kv", ("cross_attn.k", "cross_attn.v"))
    return out


def _weight_hints(hf: dict, sd: dict[str, torch.Tensor]) -> dict:
    """What a BERT or T5 config.json leaves to the weights: whether a BERT checkpoint has the
    pooler (so an NSP head), whether T5's output layer is its own (untied)."""
    kind = hf.get("model_type")
    if kind == "bert":
        return {**hf, "_nsp_head": any(k.endswith("pooler.dense.weight") for k in sd)}
    if kind == "t5":
        head, shared = sd.get("lm_head.weight"), sd.get("shared.weight")
        tied = head is None or shared is None or torch.equal(head, shared)
        return {**hf, "_tied": tied}
    return hf


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
    kind = hf.get("model_type")
    if kind in ("bloom", "bert", "t5"):
        out = {"bloom": _bloom_from_hf, "bert": _bert_from_hf, "t5": _t5_from_hf}[kind](sd, config)
    elif kind == "gpt2":
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


def _extras(config: ModelConfig, allowed: dict[str, Any]) -> list[str]:
    """Fields set away from the plain causal decoder that a family does not have (`allowed`
    maps the ones it needs to their required value, or to None for any value)."""
    out = []
    for name, plain in PLAIN.items():
        value = getattr(config, name)
        if name in allowed:
            if allowed[name] is not None and value != allowed[name]:
                out.append(f"{name}={value!r} (needs {allowed[name]!r})")
        elif value != plain:
            out.append(f"{name}={value!r}")
    return out


def _family_candidates(c: ModelConfig) -> list[tuple[str, list[str]]]:
    """(family, what stops `c` from being exported as it) for each family the config is close to."""
    mha = c.kv_heads == c.n_heads and c.dim_head * c.n_heads == c.d_model
    out = []
    if c.arch == "encoder":
        bad = _extras(
            c,
            {
                "arch": "encoder",
                "norm_position": "post",
                "embed_norm": True,
                "final_norm": None,
                "type_vocab_size": None,
                "nsp_head": None,
            },
        )
        bad += [] if mha else ["n_kv_heads/head_dim (BERT is plain multi-head)"]
        bad += [] if c.position == "learned" else [f"position={c.position!r}"]
        bad += [] if c.mlp in BERT_ACTIVATIONS.values() else [f"mlp={c.mlp!r}"]
        bad += [] if c.norm == "layernorm" and c.bias and c.has_qkv_bias else ["norm/bias"]
        out.append(("bert", bad))
    elif c.arch == "encoder_decoder":
        bad = _extras(
            c,
            {
                "arch": "encoder_decoder",
                "attn_scale": 1.0,
                "n_decoder_layers": None,
                "output_scale": None,
            },
        )
        bad += [] if c.output_scale in (1.0, c.d_model**-0.5) else ["output_scale"]
        bad += [] if c.kv_heads == c.n_heads else ["n_kv_heads (T5 is plain multi-head)"]
        bad += [] if c.position == "t5_bias" else [f"position={c.position!r}"]
        bad += [] if c.mlp in T5_ACTIVATIONS.values() else [f"mlp={c.mlp!r}"]
        bad += [] if c.norm == "rmsnorm" and not c.bias and not c.has_qkv_bias else ["norm/bias"]
        bad += [] if c.has_final_norm else ["final_norm=false"]
        out.append(("t5", bad))
    elif c.position == "alibi":
        bad = _extras(c, {"embed_norm": True})
        bad += [] if mha and c.ff_dim == 4 * c.d_model else ["heads/d_ff (BLOOM: MHA, 4*d)"]
        bad += [] if c.mlp == "gelu_tanh" else [f"mlp={c.mlp!r}"]
        bad += [] if c.norm == "layernorm" and c.bias and c.has_qkv_bias else ["norm/bias"]
        out.append(("bloom", bad))
    elif (c.position, c.norm, c.mlp) == ("rope", "rmsnorm", "swiglu"):
        qwen2 = c.has_qkv_bias and not c.bias
        if c.attention == "sliding" and not qwen2:
            bad = _extras(c, {"attention": "sliding"})
            bad += ["bias (Mistral has none)"] if c.bias or c.has_qkv_bias else []
            out.append(("mistral", bad))
        else:
            # Qwen2 has full or sliding-window attention; Llama full only.
            out.append(
                ("qwen2" if qwen2 else "llama", _extras(c, {"attention": None} if qwen2 else {}))
            )
    elif (
        (c.position, c.norm) == ("learned", "layernorm")
        and c.mlp in ("gelu", "gelu_tanh")
        and c.bias
        and c.has_qkv_bias
        and mha
    ):
        out.append(("gpt2", _extras(c, {})))
    return out


def hf_family(config: ModelConfig) -> str:
    """The HF model_type that represents `config` exactly; ConfigError when none does."""
    for family, bad in _family_candidates(config):
        if not bad:
            return family
        raise ConfigError(
            f"the closest Hugging Face family, {family}, cannot represent {', '.join(bad)}"
        )
    raise ConfigError(
        f"no Hugging Face model family matches position={config.position}, norm={config.norm}, "
        f"mlp={config.mlp}, bias={config.bias}, qkv_bias={config.has_qkv_bias}: exportable are "
        "llama/qwen2/mistral (rope + rmsnorm + swiglu), gpt2 (learned + layernorm + gelu + "
        "biases, MHA), bloom (alibi), bert (arch encoder) and t5 (arch encoder_decoder)"
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
    if family in ("bloom", "bert", "t5"):
        export = {"bloom": _bloom_to_hf, "bert": _bert_to_hf, "t5": _t5_to_hf}[family]
        return export(hf, sd, c)
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
        sliding = c.attention == "sliding"
        hf.update(
            use_sliding_window=sliding,
            sliding_window=c.window,
            max_window_layers=0 if sliding else c.n_layers,
            layer_types=[f"{'sliding' if sliding else 'full'}_attention"] * c.n_layers,
        )
    elif family == "mistral":
        hf.update(sliding_window=c.window)
    else:
        # HF Llama biases all of q/k/v/o or none: a lone output-projection bias needs zero
        # q/k/v biases beside it.
        hf.update(attention_bias=c.has_qkv_bias or c.bias, mlp_bias=c.bias)
    return hf, _llama_state_dict(sd, c)


def _bloom_to_hf(hf: dict, sd: dict[str, torch.Tensor], c: ModelConfig):
    hf.update(
        hidden_size=c.d_model,
        n_layer=c.n_layers,
        n_head=c.n_heads,
        layer_norm_epsilon=c.norm_eps,
        seq_length=c.max_seq_len,
        apply_residual_connection_post_layernorm=False,
        hidden_dropout=c.dropout,
        attention_dropout=c.dropout,
    )
    inverse = torch.argsort(_bloom_qkv_order(c))
    sd = dict(sd)
    for i in range(c.n_layers):
        for param in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{param}"
            sd[key] = sd[key][inverse].contiguous()
    out, _ = _translate(sd, [("transformer." + a, b) for a, b in BLOOM_NAMES], to_hf=True)
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return hf, out


def _bert_to_hf(hf: dict, sd: dict[str, torch.Tensor], c: ModelConfig):
    hf.update(
        architectures=["BertForPreTraining" if c.nsp_head else "BertForMaskedLM"],
        hidden_size=c.d_model,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        intermediate_size=c.ff_dim,
        hidden_act={v: k for k, v in BERT_ACTIVATIONS.items()}[c.mlp],
        max_position_embeddings=c.max_seq_len,
        type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.norm_eps,
        hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.dropout,
        position_embedding_type="absolute",
    )
    sd = dict(sd)
    if not c.type_vocab_size:  # BERT always has the table; zeros add nothing
        hf["type_vocab_size"] = 1
        sd["type_embed.weight"] = torch.zeros(1, c.d_model, dtype=sd["embed.weight"].dtype)
    size = c.n_heads * c.dim_head
    for i in range(c.n_layers):
        _split(sd, f"blocks.{i}", "attn.qkv", {"attn.q": size, "attn.k": size, "attn.v": size})
    head = {"cls.predictions.bias": sd.pop("lm_head.bias")}
    if "lm_head.weight" in sd:
        head["cls.predictions.decoder.weight"] = sd.pop("lm_head.weight")
    names = [("bert." + a, b) for a, b in BERT_NAMES] + BERT_HEAD_NAMES
    out, _ = _translate(sd, names, to_hf=True)
    return hf, {**out, **head}


def _t5_to_hf(hf: dict, sd: dict[str, torch.Tensor], c: ModelConfig):
    hf.update(
        d_model=c.d_model,
        d_kv=c.dim_head,
        d_ff=c.ff_dim,
        num_layers=c.n_layers,
        num_decoder_layers=c.decoder_layers,
        num_heads=c.n_heads,
        relative_attention_num_buckets=c.t5_num_buckets,
        relative_attention_max_distance=c.t5_max_distance,
        layer_norm_epsilon=c.norm_eps,
        feed_forward_proj={v: k for k, v in T5_ACTIVATIONS.items()}[c.mlp],
        dropout_rate=c.dropout,
        is_encoder_decoder=True,
        decoder_start_token_id=0,
        pad_token_id=0,
        # transformers >= 5 reads the scaling from scale_decoder_outputs, older versions from
        # tie_word_embeddings (and then tie only when it is true).
        scale_decoder_outputs=not math.isclose(c.output_scale, 1.0),
        tie_word_embeddings=c.tie_embeddings and not math.isclose(c.output_scale, 1.0),
        initializer_factor=c.init_std * c.d_model**0.5,
    )
    if c.tie_embeddings and math.isclose(c.output_scale, 1.0):
        # An old transformers ties only with tie_word_embeddings, which also scales: write the
        # shared table as the output layer too so both versions read the same model.
        sd = {**sd, "lm_head.weight": sd["embed.weight"].clone()}
    sd = dict(sd)
    size, kv = c.n_heads * c.dim_head, c.kv_heads * c.dim_head
    for prefix, n in (("encoder_blocks", c.n_layers), ("blocks", c.decoder_layers)):
        for i in range(n):
            _split(sd, f"{prefix}.{i}", "attn.qkv", {"attn.q": size, "attn.k": kv, "attn.v": kv})
            if c.gated_mlp:
                _split(sd, f"{prefix}.{i}", "mlp.w_in", {"mlp.gate": c.ff_dim, "mlp.up": c.ff_dim})
            if prefix == "blocks":
                _split(sd, f"blocks.{i}", "cross_attn.kv", {"cross_attn.k": kv, "cross_attn.v": kv})
    out, _ = _translate(sd, T5_NAMES, to_hf=True)
    return hf, out


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
    hf_to_model_config(hf)  # an unsupported config fails before the weights are read
    sd, source = read_hf_weights(path)
    hf = _weight_hints(hf, sd)
    config = hf_to_model_config(hf)
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
