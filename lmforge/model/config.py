"""ModelConfig: every architectural knob of the Transformer, typed and validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.config import field_
from lmforge.errors import ConfigError


def round_up(n: int, multiple: int = 64) -> int:
    """n rounded up to a multiple: matmul dimensions that are multiples of 64 run faster."""
    return multiple * ((n + multiple - 1) // multiple)


GATED_MLPS = ("swiglu", "geglu", "geglu_tanh")
BIAS_POSITIONS = ("t5_bias", "alibi")  # positions added to the attention scores

# ModelConfig fields beyond the Llama/GPT-2 families, with their plain (causal decoder) values:
# a config that changes one of them is exported only by a family that has it (interop.hf,
# interop.gguf_export), and pipeline parallelism (train.pipeline) runs only plain decoders.
PLAIN = {
    "arch": "causal",
    "norm_position": "pre",
    "deepnorm": False,
    "embed_norm": False,
    "final_norm": None,
    "qk_norm": False,
    "attn_scale": None,
    "attn_softcap": None,
    "logit_softcap": None,
    "output_scale": 1.0,
    "rope_fraction": 1.0,
    "attention": "full",
    "type_vocab_size": 0,
    "nsp_head": False,
    "n_decoder_layers": None,
}


@dataclass
class ModelConfig:
    """One Transformer covering the surveyed design space (seed 002, 4.2): causal, prefix and
    encoder-only stacks, encoder-decoder, and every norm, MLP, position and attention choice."""

    vocab_size: int = field_(8192, "vocabulary size (rows of the embedding)", ge=1)
    d_model: int = field_(256, "hidden size", ge=1)
    n_layers: int = field_(4, "Transformer blocks (encoder_decoder: encoder blocks)", ge=1)
    n_heads: int = field_(4, "attention (query) heads", ge=1)
    n_kv_heads: int | None = field_(
        None, "key/value heads: = n_heads is MHA, 1 is MQA, in between is GQA (None: n_heads)", ge=1
    )
    head_dim: int | None = field_(None, "per-head size (None: d_model // n_heads)", ge=1)
    d_ff: int | None = field_(
        None,
        "MLP hidden size (None: 4*d_model, or 2/3 of that for gated MLPs, see ff_two_thirds)",
        ge=1,
    )
    max_seq_len: int = field_(256, "longest sequence the model accepts", ge=1)
    arch: Literal["causal", "prefix", "encoder", "encoder_decoder"] = field_(
        "causal",
        "causal decoder (GPT), prefix decoder (bidirectional over a prefix, GLM/U-PaLM), "
        "encoder-only (BERT: MLM head) or encoder-decoder (T5)",
    )
    n_decoder_layers: int | None = field_(
        None, "encoder_decoder: decoder blocks (None: n_layers)", ge=1
    )
    norm: Literal["rmsnorm", "layernorm"] = field_("rmsnorm", "normalization layer")
    norm_eps: float = field_(1e-5, "epsilon of the normalization", gt=0)
    norm_position: Literal["pre", "post", "sandwich"] = field_(
        "pre",
        "pre-norm x+f(N(x)) (GPT-2, Llama), post-norm N(x+f(x)) (original Transformer, BERT) "
        "or sandwich-norm x+N(f(N(x))) (CogView)",
    )
    deepnorm: bool = field_(
        False, "DeepNorm (Wang et al. 2022): post-norm N(alpha*x + f(x)), sub-layer init times beta"
    )
    embed_norm: bool = field_(False, "a norm right after the embeddings (BLOOM, BERT)")
    final_norm: bool | None = field_(
        None, "a norm after the last block (None: yes for pre/sandwich-norm, no for post-norm)"
    )
    mlp: Literal["relu", "gelu", "gelu_tanh", "swiglu", "geglu", "geglu_tanh"] = field_(
        "swiglu",
        "feed-forward: ReLU (T5, Transformer), GeLU (BERT; gelu_tanh is GPT-2's) or the gated "
        "SwiGLU (Llama, PaLM) / GeGLU (Shazeer 2020; geglu_tanh with the tanh GeLU: T5 v1.1, "
        "Flan-T5, Gemma)",
    )
    ff_two_thirds: bool = field_(
        True, "gated MLPs with d_ff unset: 2/3 * 4*d_model (rounded to 64) to keep a 4d MLP's size"
    )
    position: Literal["rope", "learned", "sinusoidal", "t5_bias", "alibi", "none"] = field_(
        "rope",
        "RoPE (Su 2021), learned absolute (GPT-2), sinusoidal (Vaswani 2017), T5 relative bias "
        "(Raffel 2020), ALiBi (Press 2022) or none",
    )
    rope_theta: float = field_(10000.0, "RoPE base frequency", gt=0)
    rope_fraction: float = field_(
        1.0, "fraction of each head's dimensions RoPE rotates (GPT-NeoX: 0.25)", gt=0, le=1
    )
    t5_num_buckets: int = field_(32, "T5 relative bias: buckets", ge=2)
    t5_max_distance: int = field_(128, "T5 relative bias: distance of the last bucket", ge=2)
    attention: Literal["full", "sliding", "block_sparse"] = field_(
        "full",
        "full, sliding-window (Longformer, Mistral) or block-sparse local + strided attention "
        "(Sparse Transformer, Child et al. 2019)",
    )
    window: int | None = field_(
        None, "sliding: keys each query sees, itself included (bidirectional: each side)", ge=1
    )
    sparse_block: int = field_(64, "block_sparse: block length l (local block and stride)", ge=1)
    sparse_pattern: Literal["fixed", "strided"] = field_(
        "fixed", "block_sparse: Sparse Transformer 'fixed' (block + summary columns) or 'strided'"
    )
    sparse_summary: int = field_(
        1, "block_sparse fixed: last c positions of every block that all later queries see", ge=1
    )
    sparse_kernel: Literal["sdpa", "flex"] = field_(
        "sdpa",
        "sliding/block_sparse kernel: SDPA with a dense mask, or compiled flex_attention with a "
        "block mask (skips empty blocks; falls back to SDPA where it cannot run)",
    )
    qk_norm: bool = field_(False, "normalize queries and keys per head (Dehghani et al. 2023)")
    attn_scale: float | None = field_(
        None, "attention score scale (None: 1/sqrt(head_dim); T5: 1, folded into its init)", gt=0
    )
    attn_softcap: float | None = field_(
        None, "soft-cap attention logits at cap*tanh(x/cap) (Gemma 2: 50)", gt=0
    )
    logit_softcap: float | None = field_(
        None, "soft-cap the output logits at cap*tanh(x/cap) (Gemma 2: 30)", gt=0
    )
    type_vocab_size: int = field_(0, "encoder: token-type (segment) embeddings (BERT: 2)", ge=0)
    nsp_head: bool = field_(False, "encoder: pooler + next-sentence-prediction classifier (BERT)")
    output_scale: float = field_(
        1.0,
        "multiplier of the final hidden states before the output layer (tied T5: d**-0.5)",
        gt=0,
    )
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
        if self.position == "rope" and self.rope_dim % 2:
            raise ConfigError(
                f"RoPE needs an even number of rotated dimensions: head_dim {self.dim_head} * "
                f"rope_fraction {self.rope_fraction} = {self.rope_dim}"
            )
        if self.position == "alibi" and self.arch == "encoder_decoder":
            raise ConfigError(
                "position='alibi' is not defined for arch='encoder_decoder': ALiBi biases by "
                "distance, and decoder-to-encoder cross-attention has none"
            )
        if self.nsp_head and self.arch != "encoder":
            raise ConfigError(
                f"nsp_head=true needs arch='encoder' (next-sentence prediction reads a "
                f"bidirectional [CLS] state), got arch={self.arch!r}"
            )
        if self.type_vocab_size and self.arch != "encoder":
            raise ConfigError(
                f"type_vocab_size={self.type_vocab_size} needs arch='encoder', got "
                f"arch={self.arch!r}"
            )
        if self.n_decoder_layers is not None and self.arch != "encoder_decoder":
            raise ConfigError(
                f"n_decoder_layers is set but arch={self.arch!r}; it needs arch='encoder_decoder'"
            )
        if self.attention == "sliding":
            if self.window is None:
                raise ConfigError("attention='sliding' needs window set")
            if self.window > self.max_seq_len:
                raise ConfigError(
                    f"window ({self.window}) is larger than max_seq_len ({self.max_seq_len})"
                )
        if self.attention == "block_sparse":
            if self.sparse_block > self.max_seq_len:
                raise ConfigError(
                    f"sparse_block ({self.sparse_block}) is larger than max_seq_len "
                    f"({self.max_seq_len})"
                )
            if self.sparse_summary > self.sparse_block:
                raise ConfigError(
                    f"sparse_summary ({self.sparse_summary}) is larger than sparse_block "
                    f"({self.sparse_block})"
                )
        if self.deepnorm and self.norm_position != "post":
            raise ConfigError(
                f"deepnorm=true is a post-norm scheme; it needs norm_position='post', got "
                f"norm_position={self.norm_position!r}"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.dim_head * self.rope_fraction)

    @property
    def decoder_layers(self) -> int:
        """Blocks of the decoder stack: n_decoder_layers for encoder_decoder, else n_layers."""
        return self.n_decoder_layers or self.n_layers

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU/GeGLU: the MLP's input projection is the fused [gate; up] of 2*ff_dim rows."""
        return self.mlp in GATED_MLPS

    @property
    def has_final_norm(self) -> bool:
        return self.norm_position != "post" if self.final_norm is None else self.final_norm

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.gated_mlp and self.ff_two_thirds:
            # Gated units have three matrices; 2/3 * 4d keeps the parameter count of a 4d MLP
            # (Shazeer 2020, as in Llama), rounded up to a multiple of 64 for fast matmuls.
            return round_up(int(8 * self.d_model / 3))
        return 4 * self.d_model

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias
