"""The Transformer (seed 002, 4.2.1): causal decoder, prefix decoder, encoder-only (BERT) and
encoder-decoder (T5), one class configured by ModelConfig."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.model.attention import (
    Attention,
    CrossAttention,
    FlexMask,
    KVCache,
    SlotBatch,
    build_mask,
    pattern_mask,
)
from lmforge.model.config import BIAS_POSITIONS, ModelConfig
from lmforge.model.heads import MLMTransform, NSPHead
from lmforge.model.layers import MLP, Linear, RMSNorm, deepnorm_constants, make_norm
from lmforge.model.positions import (
    RelativePositionBias,
    RotaryEmbedding,
    alibi_bias,
    sinusoidal_table,
)


class Block(nn.Module):
    """One residual block: self-attention, cross-attention (encoder-decoder decoder only), MLP.

    Each sub-layer f is wrapped as the config's norm_position says (seed 002, 4.2.2):
    pre-norm x + f(N(x)) (GPT-2, Llama), post-norm N(x + f(x)) (Vaswani 2017, BERT),
    sandwich-norm x + N'(f(N(x))) (CogView), or DeepNorm N(alpha * x + f(x)) (Wang et al. 2022).
    """

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        *,
        causal: bool = True,
        cross: bool = False,
        alpha: float = 1.0,
    ) -> None:
        super().__init__()
        self.position, self.alpha = config.norm_position, alpha
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer, causal)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        sandwich = config.norm_position == "sandwich"
        if sandwich:
            self.attn_post_norm, self.mlp_post_norm = make_norm(config), make_norm(config)
        if cross:
            self.cross_norm = make_norm(config)
            self.cross_attn = CrossAttention(config, layer)
            if sandwich:
                self.cross_post_norm = make_norm(config)
        self.drop = nn.Dropout(config.dropout) if config.dropout else None

    def forward(self, x, rope, mask, cache=None, memory=None, memory_mask=None):
        """memory, memory_mask: encoder output and its mask, for a block with cross-attention."""
        if self.position == "pre":
            h = self.attn(self.attn_norm(x), rope, mask, cache)
            if self.drop is not None:
                h = self.drop(h)
            x = x + h
            if memory is not None:
                x = x + self._drop(self.cross_attn(self.cross_norm(x), memory, memory_mask, cache))
            h = self.mlp(self.mlp_norm(x))
            if self.drop is not None:
                h = self.drop(h)
            return x + h
        x = self._sublayer(x, lambda y: self.attn(y, rope, mask, cache), "attn")
        if memory is not None:
            x = self._sublayer(x, lambda y: self.cross_attn(y, memory, memory_mask, cache), "cross")
        return self._sublayer(x, self.mlp, "mlp")

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.drop is None else self.drop(h)

    def _sublayer(self, x: torch.Tensor, f, name: str) -> torch.Tensor:
        norm = getattr(self, f"{name}_norm")
        if self.position == "post":
            return norm(self.alpha * x + self._drop(f(x)))
        return x + self._drop(getattr(self, f"{name}_post_norm")(f(norm(x))))


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab). Losses live in lmforge.train.objectives.

    arch "causal" and "prefix": a decoder stack `blocks`; "encoder": a bidirectional stack
    `blocks` with BERT's MLM transform (`mlm_transform`) before the output layer and an optional
    NSP head; "encoder_decoder": `encoder_blocks` (+ `encoder_norm`) and the decoder `blocks`,
    whose blocks also attend to the encoder output. The output layer is always `lm_head`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = c = config
        enc_dec = c.arch == "encoder_decoder"
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        if c.position == "learned":
            self.pos_embed = nn.Embedding(c.max_seq_len, c.d_model)
        if c.type_vocab_size:
            self.type_embed = nn.Embedding(c.type_vocab_size, c.d_model)
        self.embed_norm = make_norm(c) if c.embed_norm else None
        self.rope = None
        if c.position == "rope":
            self.rope = RotaryEmbedding(c.rope_dim, c.max_seq_len, c.rope_theta)
        self.drop = nn.Dropout(c.dropout)
        alphas = {}
        if c.deepnorm:
            alphas = deepnorm_constants(c.n_layers, c.decoder_layers if enc_dec else 0)
        alpha = {name: a for name, (a, _) in alphas.items()}
        if enc_dec:
            self.encoder_blocks = nn.ModuleList(
                Block(c, i, causal=False, alpha=alpha.get("encoder_blocks", 1.0))
                for i in range(c.n_layers)
            )
            self.encoder_norm = make_norm(c) if c.has_final_norm else nn.Identity()
        causal = c.arch != "encoder"
        self.blocks = nn.ModuleList(
            Block(c, i, causal=causal, cross=enc_dec, alpha=alpha.get("blocks", 1.0))
            for i in range(c.decoder_layers)
        )
        if c.position == "t5_bias":
            # One learned bias per stack, shared by its layers (Raffel et al. 2020); a decoder's
            # buckets only cover keys before the query.
            buckets, distance = c.t5_num_buckets, c.t5_max_distance
            self.rel_bias = RelativePositionBias(
                c.n_heads, buckets, distance, bidirectional=c.arch in ("prefix", "encoder")
            )
            if enc_dec:
                self.encoder_rel_bias = RelativePositionBias(
                    c.n_heads, buckets, distance, bidirectional=True
                )
        self.norm = make_norm(c) if c.has_final_norm else nn.Identity()
        if c.arch == "encoder":
            self.mlm_transform = MLMTransform(c)
            if c.nsp_head:
                self.nsp_head = NSPHead(c)
        # BERT's MLM output layer has a bias of its own (per vocabulary entry).
        self.lm_head = Linear(c.d_model, c.vocab_size, bias=c.arch == "encoder" and c.bias)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # The causal decode path keeps SDPA's is_causal fast path (no mask tensor) when nothing
        # beyond causal order and padding shapes attention.
        self._plain_causal = (
            c.arch in ("causal", "prefix")
            and c.attention == "full"
            and c.position not in BIAS_POSITIONS
        )
        self._deepnorm_beta = {name: b for name, (_, b) in alphas.items()}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere; residual output projections scaled by 1/sqrt(2L)
        so the residual stream's variance does not grow with depth (Radford et al. 2019).
        With DeepNorm the value, output and FFN projections are scaled by the stack's beta
        instead (Wang et al. 2022, Sec. 3)."""
        c = self.config
        std = c.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for name in ("encoder_blocks", "blocks"):
            blocks = getattr(self, name, None)
            if blocks is None:
                continue
            beta = self._deepnorm_beta.get(name)
            for block in blocks:
                attns = [block.attn] + ([block.cross_attn] if hasattr(block, "cross_attn") else [])
                if beta is None:
                    for proj in [a.out for a in attns] + [block.mlp.w_out]:
                        nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * len(blocks)))
                    continue
                with torch.no_grad():
                    for a in attns:
                        values = a.qkv.weight if hasattr(a, "qkv") else a.kv.weight
                        values[-a.kv_heads * a.head_dim :].mul_(beta)
                        a.out.weight.mul_(beta)
                    block.mlp.w_in.weight.mul_(beta)
                    block.mlp.w_out.weight.mul_(beta)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | SlotBatch | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        hidden_only: bool = False,
        prefix_len: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits for `input_ids` (B, T).

        attention_mask: (B, past + T), 1 for real tokens and 0 for padding, covering the
        cached positions too. cache: a KVCache to read past keys from and append to, or a
        SlotBatch, whose rows each have their own length (it supplies positions and the mask).
        logits_to_keep: if > 0, compute logits for the last n positions only (generation).
        return_hidden: also return the final hidden states (B, T, d_model).
        hidden_only: return the output layer's input alone, so `model.lm_head(hidden)` are the
        logits (before logit_softcap), and skip the output layer (for a loss that applies it
        chunk by chunk: lmforge.train.objectives.linear_cross_entropy).

        prefix_len (arch "prefix"): (B,) positions [0, prefix_len[b]) of row b attend to each
        other bidirectionally; the rest is causal (None: all causal).
        token_type_ids (arch "encoder", type_vocab_size > 0): (B, T) segment ids (None: 0).
        The encoder returns masked-LM logits; `nsp_logits(hidden)` reads return_hidden's states.
        Encoder-decoder: `input_ids`/`attention_mask` are the encoder's (or pass `memory` from
        `encode` instead of input_ids), `decoder_input_ids` (B, T_dec) and
        `decoder_attention_mask` (B, past + T_dec) the decoder's, whose logits are returned;
        `cache` (from new_cache) then holds the decoder's keys/values and the cross-attention
        keys/values of the memory, computed on the first call.
        """
        if self.config.arch == "encoder_decoder":
            if decoder_input_ids is None:
                raise ValueError("an encoder_decoder model needs decoder_input_ids")
            if memory is None:
                memory = self.encode(input_ids, attention_mask=attention_mask)
            memory_mask = None
            if attention_mask is not None:
                memory_mask = attention_mask[:, None, None, :].bool()
            h = self._stack(
                decoder_input_ids,
                attention_mask=decoder_attention_mask,
                position_ids=None,
                cache=cache,
                memory=memory,
                memory_mask=memory_mask,
            )
        else:
            if decoder_input_ids is not None or memory is not None:
                raise ValueError(
                    f"decoder_input_ids/memory need arch='encoder_decoder', not {self.config.arch!r}"
                )
            if prefix_len is not None and self.config.arch != "prefix":
                raise ValueError(f"prefix_len needs arch='prefix', not {self.config.arch!r}")
            h = self._stack(
                input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                prefix_len=prefix_len,
                token_type_ids=token_type_ids,
            )
        return self._output(h, logits_to_keep, return_hidden, hidden_only)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, S, d_model) of the encoder: the encoder stack of an
        encoder_decoder model (the `memory` its decoder attends to), or an encoder model's."""
        arch = self.config.arch
        if arch == "encoder":
            return self._stack(
                input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
        if arch != "encoder_decoder":
            raise ValueError(f"encode needs arch 'encoder' or 'encoder_decoder', not {arch!r}")
        return self._stack(input_ids, attention_mask=attention_mask, encoder=True)

    def nsp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-sentence logits (B, 2) from an encoder's final hidden states (B, T, d_model),
        read at the first ([CLS]) position; needs nsp_head=True."""
        if not hasattr(self, "nsp_head"):
            raise ValueError("this model has no NSP head: set nsp_head=true (arch 'encoder')")
        return self.nsp_head(hidden[:, 0])

    def _embed(self, input_ids, position_ids, token_type_ids) -> torch.Tensor:
        x = self.embed(input_ids)
        position = self.config.position
        if position == "learned":
            x = x + self.pos_embed(position_ids)
        elif position == "sinusoidal":
            # Vaswani et al. 2017, Sec. 3.4: embeddings times sqrt(d_model) before the fixed
            # unit-amplitude table is added; at init std 0.02 the table would drown the tokens.
            d = self.config.d_model
            x = x * math.sqrt(d) + sinusoidal_table(position_ids, d).to(x.dtype)
        if hasattr(self, "type_embed"):
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_embed(token_type_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.drop(x)

    def _stack(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | SlotBatch | None = None,
        prefix_len: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        encoder: bool = False,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed `input_ids` and run one stack (the encoder's if `encoder`); normalized output."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds the model's max_seq_len "
                f"{self.config.max_seq_len}"
            )
        if isinstance(cache, SlotBatch):
            if attention_mask is not None:
                raise ValueError("a SlotBatch masks by its slot lengths; give no attention_mask")
            position_ids = cache.positions(T) if position_ids is None else position_ids
        elif position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
        x = self._embed(input_ids, position_ids, token_type_ids)
        rope = self.rope(position_ids) if self.rope is not None else None
        if self._plain_causal and prefix_len is None and not encoder:
            if isinstance(cache, SlotBatch):
                mask = cache.mask(T)
            else:
                mask = build_mask(T, past, attention_mask, input_ids.device)
        else:
            mask = self._mask(T, past, cache, attention_mask, prefix_len, encoder)
        blocks = self.encoder_blocks if encoder else self.blocks
        for block in blocks:
            if memory is None:
                x = block(x, rope, mask, cache)
            else:
                x = block(x, rope, mask, cache, memory, memory_mask)
        if cache is not None:
            cache.advance(T)
        return (self.encoder_norm if encoder else self.norm)(x)

    def _mask(self, T, past, cache, attention_mask, prefix_len, encoder):
        """The mask (with any ALiBi/T5 bias folded in) shared by all layers of a stack."""
        c = self.config
        causal = c.arch != "encoder" and not encoder
        device = self.embed.weight.device
        if isinstance(cache, SlotBatch):
            q_pos = cache.positions(T)
        else:
            q_pos = torch.arange(past, past + T, device=device)[None]
        S = past + T
        if (
            c.sparse_kernel == "flex"
            and c.attention != "full"
            and cache is None
            and attention_mask is None
            and c.position not in BIAS_POSITIONS
            and c.attn_softcap is None
        ):
            return FlexMask(c, T, causal, prefix_len, device)
        bias = None
        if c.position == "alibi":
            bias = alibi_bias(c.n_heads, q_pos, torch.arange(S, device=device), causal=causal)
        elif c.position == "t5_bias":
            rel_bias = self.encoder_rel_bias if encoder else self.rel_bias
            bias = rel_bias(q_pos, torch.arange(S, device=device))
        if bias is not None:
            bias = bias.to(self.embed.weight.dtype)
        return pattern_mask(
            c,
            q_pos,
            S,
            causal=causal,
            key_padding=attention_mask,
            prefix_len=prefix_len,
            bias=bias,
        )

    def _output(self, h, logits_to_keep, return_hidden, hidden_only):
        c = self.config
        z = h[:, -logits_to_keep:] if logits_to_keep else h
        if c.arch == "encoder":
            z = self.mlm_transform(z)
        if c.output_scale != 1.0:
            z = z * c.output_scale
        if hidden_only:
            return z
        logits = self.lm_head(z)
        if c.logit_softcap is not None:
            # Gemma 2: cap * tanh(logits / cap) bounds the output logits.
            logits = c.logit_softcap * torch.tanh(logits / c.logit_softcap)
        return (logits, h) if return_hidden else logits

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache matching this model's dtype and device (the decoder's, for an
        encoder_decoder model)."""
        p = self.embed.weight
        return KVCache(self.config, batch_size, max_len, dtype=p.dtype, device=p.device)

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameters counted once (tied weights once). non_embedding drops the token, position
        and token-type embedding tables (Kaplan et al. 2020's N); an untied output layer stays."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            for name in ("embed", "pos_embed", "type_embed"):
                if hasattr(self, name):
                    n -= getattr(self, name).weight.numel()
        return n

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: every Linear, including the output layer."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, PaLM (Chowdhery et al. 2022, App. B): 6N + 12*L*H*Dh*T, with
        L counting encoder and decoder layers (an approximation for encoder-decoders, whose
        tokens go through one stack or the other)."""
        c = self.config
        T = seq_len or c.max_seq_len
        layers = c.n_layers + (c.decoder_layers if c.arch == "encoder_decoder" else 0)
        return 6 * self.matmul_params() + 12 * layers * c.n_heads * c.dim_head * T
