"""GGUF export: an lmforge model and its tokenizer as a file llama.cpp loads (F32, F16, Q8_0, Q4_0).

The inverse of `interop.gguf`: lmforge's fused q/k/v and gate/up matrices are split into
llama.cpp's tensors (LLM_TENSOR_NAMES), and for the `llama` architecture the q/k rows of each head
are permuted from the half-split RoPE order lmforge uses to the interleaved order llama.cpp's
LLAMA_ROPE_TYPE_NORM expects (what convert_hf_to_gguf.py's LlamaModel.permute does). Models with
q/k/v biases go out as `qwen2`, whose NEOX RoPE is half-split already. The GGUF container is
written by the `gguf` package's GGUFWriter; the Q8_0/Q4_0 blocks are quantized here in torch, the
inverse of the dequantizers in `interop.ggml`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter, LlamaFileType

from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.config import PLAIN
from lmforge.tokenizer.gguf import CONTROL, NORMAL, PRE_TOKENIZERS, UNUSED, USER_DEFINED

GGUFType = Literal["f32", "f16", "q8_0", "q4_0"]
TENSOR_TYPES = {"f32": QType.F32, "f16": QType.F16, "q8_0": QType.Q8_0, "q4_0": QType.Q4_0}
FILE_TYPES = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
}
BLOCK = 32  # QK8_0 = QK4_0 = 32 values per block (ggml-common.h)

# lmforge module names -> llama.cpp's (LLM_TENSOR_NAMES); the fused qkv and w_in are split.
LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn.out": "attn_output",
    "mlp_norm": "ffn_norm",
    "mlp.w_out": "ffn_down",
}
TOP_NAMES = {"embed": "token_embd", "norm": "output_norm", "lm_head": "output"}


# ------------------------------------------------------------------------- block quantizers


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero), which ggml's reference quantizer uses; torch.round
    rounds ties to even. Written with the fraction, not |x| + 0.5, which itself rounds in fp32."""
    a = x.abs()
    whole = a.floor()
    return torch.copysign(whole + (a - whole >= 0.5).float(), x)


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """A (blocks, 1) float32 scale column as the two little-endian bytes of its float16."""
    return d.to(torch.float16).view(torch.uint8)


def quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) float32 -> (n, 34) bytes of block_q8_0 {half d; int8 qs[32]}, x ~ d * q:
    d = max|x| / 127 and q = roundf(x / d), as quantize_row_q8_0_ref in ggml-quants.c."""
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = _round_half_away(blocks * inv).to(torch.int8)
    return torch.cat([_f16_bytes(d), q.view(torch.uint8)], dim=1)


def quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) float32 -> (n, 18) bytes of block_q4_0 {half d; uint8 qs[16]}, x ~ d * (q - 8):
    d = m / -8 for the value m of largest magnitude (so m itself maps to q = 0 exactly), q =
    min(15, trunc(x / d + 8.5)); byte j holds value j in its low nibble and value j + 16 in its
    high nibble (quantize_row_q4_0_ref in ggml-quants.c)."""
    at = blocks.abs().argmax(dim=1, keepdim=True)
    d = blocks.gather(1, at) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = (blocks * inv + 8.5).trunc().clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), q[:, :16] | (q[:, 16:] << 4)], dim=1)


_QUANTIZERS = {QType.Q8_0: quantize_q8_0, QType.Q4_0: quantize_q4_0}


def tensor_type(weight: torch.Tensor, gguf_type: GGUFType) -> QType:
    """The ggml type a tensor is stored in: vectors (norm weights, biases) stay F32 as in
    llama.cpp's own converter; a matrix whose rows are not whole 32-value blocks falls back to
    F16 (convert_hf_to_gguf.py does the same)."""
    qtype = TENSOR_TYPES[gguf_type]
    if weight.ndim < 2:
        return QType.F32
    if qtype in _QUANTIZERS and weight.shape[-1] % BLOCK:
        return QType.F16
    return qtype


def encode_tensor(weight: torch.Tensor, qtype: QType) -> np.ndarray:
    """The tensor in ggml type `qtype`, as the array GGUFWriter.add_tensor takes: float32/float16
    values, or for block types one row of block bytes per tensor row."""
    w = weight.detach().to(torch.float32).contiguous()
    if qtype == QType.F32:
        return w.numpy()
    if qtype == QType.F16:
        return w.to(torch.float16).numpy()
    raw = _QUANTIZERS[qtype](w.reshape(-1, BLOCK))
    return raw.reshape(*w.shape[:-1], -1).numpy()


# ------------------------------------------------------------------------- architecture


def gguf_architecture(config: ModelConfig) -> str:
    """llama.cpp's architecture for `config`: `llama`, or `qwen2` when q/k/v carry biases;
    ConfigError naming every field llama.cpp's Llama-family graphs cannot express."""
    needs = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
    wrong = [
        f"{key}={getattr(config, key)!r} (needs {value!r})"
        for key, value in needs.items()
        if getattr(config, key) != value
    ]
    # Everything beyond the plain causal decoder (prefix/encoder archs, sliding windows, QK-norm,
    # soft-capping, DeepNorm, ...) is outside those graphs too.
    wrong += [
        f"{key}={getattr(config, key)!r} (needs {plain!r})"
        for key, plain in PLAIN.items()
        if getattr(config, key) != plain
    ]
    if wrong:
        raise ConfigError(
            "GGUF export supports llama.cpp's llama/qwen2 architectures (RoPE, RMSNorm, SwiGLU, "
            f"no output/MLP biases); this model has {', '.join(wrong)}"
        )
    return "qwen2" if config.has_qkv_bias else "llama"


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Within each head, reorder q/k rows from the two RoPE halves (0..D/2-1, D/2..D-1) to
    interleaved pairs (0, D/2, 1, D/2+1, ...): the inverse of interop.gguf.unpermute_rope_rows."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, -1, *rest).transpose(1, 2).reshape(w.shape)


def gguf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's tensor names and layouts (tied output stored once)."""
    c = model.config
    arch = gguf_architecture(c)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if c.tie_embeddings:
        sd.pop("lm_head.weight", None)
    q, kv = c.n_heads * c.dim_head, c.kv_heads * c.dim_head
    out, unknown = {}, []
    for name, tensor in sd.items():
        module, _, param = name.rpartition(".")
        parts = module.split(".", 2)
        if module in TOP_NAMES:
            out[f"{TOP_NAMES[module]}.{param}"] = tensor
        elif parts[0] == "blocks" and len(parts) == 3:
            prefix, inner = f"blk.{parts[1]}", parts[2]
            if inner == "attn.qkv":
                wq, wk, wv = tensor.split([q, kv, kv])
                if arch == "llama":  # LLAMA_ROPE_TYPE_NORM rotates interleaved pairs
                    wq, wk = permute_rope_rows(wq, c.n_heads), permute_rope_rows(wk, c.kv_heads)
                for part, t in zip(("attn_q", "attn_k", "attn_v"), (wq, wk, wv)):
                    out[f"{prefix}.{part}.{param}"] = t
            elif inner == "mlp.w_in":
                gate, up = tensor.chunk(2)
                out[f"{prefix}.ffn_gate.{param}"], out[f"{prefix}.ffn_up.{param}"] = gate, up
            elif inner in LAYER_NAMES:
                out[f"{prefix}.{LAYER_NAMES[inner]}.{param}"] = tensor
            else:
                unknown.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise ConfigError(
            f"GGUF export: tensors {unknown[:4]} have no llama.cpp counterpart (a quantized or "
            "adapter-wrapped model? merge adapters and export the floating-point model)"
        )
    return out


# ------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level pre-tokenizer: GPT-2's ByteLevel regex,
    or a sequence of Split regexes (as tokenizer.gguf builds them) of a family llama.cpp knows."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        if spec.get("add_prefix_space"):
            raise ConfigError("GGUF export: a ByteLevel pre-tokenizer with add_prefix_space")
        return "gpt-2"
    steps = spec.get("pretokenizers") if spec and spec.get("type") == "Sequence" else None
    if steps:
        *splits, last = steps
        if last.get("type") == "ByteLevel" and not last.get("use_regex", True):
            regexes = tuple(s.get("pattern", {}).get("Regex") for s in splits)
            for name, family in PRE_TOKENIZERS.items():  # first name of each family wins
                if family == regexes:
                    return name
    raise ConfigError(
        "GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp implements "
        f"(byte-level with one of the regex families of lmforge.tokenizer.gguf): {spec}"
    )


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """`tokenizer.ggml.*` values of a byte-level BPE tokenizer (the "gpt2" vocabulary kind),
    padded with unused tokens up to the model's vocab_size, as convert_hf_to_gguf.py does."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise ConfigError(
            f"GGUF export needs a byte-level BPE tokenizer; this one is {model.get('type')} "
            f"with a {spec.get('decoder', {}).get('type')} decoder"
        )
    if spec.get("normalizer") is not None:
        raise ConfigError(
            f"GGUF export: llama.cpp applies no normalizer ({spec['normalizer'].get('type')})"
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ConfigError("GGUF export: the tokenizer's token ids are not 0..n-1 without gaps")
    if len(vocab) > vocab_size:
        raise ConfigError(
            f"GGUF export: the tokenizer has {len(vocab)} tokens but the model only "
            f"vocab_size={vocab_size} embedding rows"
        )
    tokens = sorted(vocab, key=vocab.__getitem__)
    types = [NORMAL] * len(tokens)
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    pad = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [UNUSED] * pad
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "model": "gpt2",
        "pre": _pre_tokenizer_name(spec.get("pre_tokenizer")),
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "add_bos": tokenizer.adds_bos,
    }
    for key in ("bos", "eos", "pad"):
        meta[f"{key}_id"] = getattr(tokenizer, f"{key}_id")
    meta["chat_template"] = tokenizer.chat_template
    return meta


def _add_tokenizer(writer: GGUFWriter, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    writer.add_token_merges(meta["merges"])
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(False)
    for key, add in (
        ("bos_id", writer.add_bos_token_id),
        ("eos_id", writer.add_eos_token_id),
        ("pad_id", writer.add_pad_token_id),
    ):
        if meta[key] is not None:
            add(meta[key])
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


# ------------------------------------------------------------------------- the file


def export_gguf(
    model: Transformer,
    path: str | Path,
    *,
    tokenizer: Any = None,
    gguf_type: GGUFType = "f16",
    name: str = "lmforge",
) -> Path:
    """Write `model` (and its byte-level BPE `tokenizer`, if given) as a GGUF file llama.cpp
    loads; matrices in `gguf_type`, vectors in F32. Written to a temporary file and renamed into
    place."""
    if gguf_type not in TENSOR_TYPES:
        raise ConfigError(f"gguf_type {gguf_type!r}: choose one of {', '.join(TENSOR_TYPES)}")
    c = model.config
    arch = gguf_architecture(c)
    tensors = gguf_state_dict(model)
    meta = tokenizer_metadata(tokenizer, c.vocab_size) if tokenizer is not None else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    writer = GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name)
        writer.add_file_type(FILE_TYPES[gguf_type])
        writer.add_vocab_size(c.vocab_size)
        writer.add_context_length(c.max_seq_len)
        writer.add_embedding_length(c.d_model)
        writer.add_block_count(c.n_layers)
        writer.add_feed_forward_length(c.ff_dim)
        writer.add_head_count(c.n_heads)
        writer.add_head_count_kv(c.kv_heads)
        writer.add_key_length(c.dim_head)
        writer.add_value_length(c.dim_head)
        writer.add_rope_dimension_count(c.dim_head)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_layer_norm_rms_eps(c.norm_eps)
        if meta is not None:
            _add_tokenizer(writer, meta)
        else:  # llama.cpp needs the key; "none" loads a model that takes token ids only
            writer.add_tokenizer_model("none")
        for tensor_name, tensor in tensors.items():
            qtype = tensor_type(tensor, gguf_type)
            writer.add_tensor(tensor_name, encode_tensor(tensor, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def convert_to_gguf(src: str | Path, dst: str | Path, *, gguf_type: GGUFType = "f16") -> Path:
    """Any model `lmforge.load` reads (checkpoint, run, Hugging Face directory, GGUF file) and
    its tokenizer, when it has one, as a GGUF file."""
    from lmforge.loading import load, load_tokenizer, resolve

    kind, directory = resolve(src)
    model = load(src)
    tokenizer = None
    if kind == "gguf" or (directory / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(src)
    return export_gguf(model, dst, tokenizer=tokenizer, gguf_type=gguf_type, name=Path(src).name)
