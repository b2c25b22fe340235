"""ModelConfig: every architectural knob of the Transformer, typed and validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.config import field_
from lmforge.errors import ConfigError


def round_up(n: int, multiple: int = 64) -> int:
    """n rounded up to a multiple: matmul dimensions that are multiples of 64 run faster."""
    return multiple * ((n + multiple - 1) // multiple)


@dataclass
class ModelConfig:
    """A causal decoder covering the Llama and GPT-2 families (seed 002, 4.2)."""

    vocab_size: int = field_(8192, "vocabulary size (rows of the embedding)", ge=1)
    d_model: int = field_(256, "hidden size", ge=1)
    n_layers: int = field_(4, "number of Transformer blocks", ge=1)
    n_heads: int = field_(4, "attention (query) heads", ge=1)
    n_kv_heads: int | None = field_(
        None, "key/value heads: = n_heads is MHA, 1 is MQA, in between is GQA (None: n_heads)", ge=1
    )
    head_dim: int | None = field_(None, "per-head size (None: d_model // n_heads)", ge=1)
    d_ff: int | None = field_(
        None, "MLP hidden size (None: 4*d_model, or 2/3 of that rounded to 64 for gated MLPs)", ge=1
    )
    max_seq_len: int = field_(256, "longest sequence the model accepts", ge=1)
    norm: Literal["rmsnorm", "layernorm"] = field_("rmsnorm", "normalization (pre-norm)")
    norm_eps: float = field_(1e-5, "epsilon of the normalization", gt=0)
    mlp: Literal["swiglu", "gelu", "gelu_tanh"] = field_(
        "swiglu", "feed-forward: gated SwiGLU (Llama) or a GeLU MLP (gelu_tanh is GPT-2's)"
    )
    position: Literal["rope", "learned"] = field_("rope", "RoPE or learned absolute positions")
    rope_theta: float = field_(10000.0, "RoPE base frequency", gt=0)
    bias: bool = field_(False, "biases in linear layers and LayerNorm (GPT-2: true, Llama: false)")
    qkv_bias: bool | None = field_(None, "bias on the q/k/v projections only (None: follow bias)")
    tie_embeddings: bool = field_(True, "share the input embedding with the output layer")
    init_std: float = field_(0.02, "std of the normal weight init (GPT-2)", gt=0)
    dropout: float = field_(0.0, "dropout on attention and residual branches", ge=0, le=1)

    def validate(self) -> None:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                "or head_dim must be set"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})"
            )
        if self.position == "rope" and self.dim_head % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.dim_head}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            # Gated units have three matrices; 2/3 * 4d keeps the parameter count of a 4d MLP
            # (Shazeer 2020, as in Llama), rounded up to a multiple of 64 for fast matmuls.
            return round_up(int(8 * self.d_model / 3))
        return 4 * self.d_model

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias
