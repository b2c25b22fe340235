"""Parameter-efficient tuning (seed 002 §5.3) as wrappers over any lmforge Transformer: LoRA,
adapter tuning, prefix tuning and prompt tuning.

The base model is never rebuilt or renamed: adapters live under `model.peft` and act through
forward hooks on the base modules, so the model stays a Transformer (generation, export and
`save_model` keep working), its state_dict stays the base's, and its weights stay frozen and
bit-identical. Several adapters can sit on one base; `set_adapter` picks the active one.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import field_, from_dict, to_dict
from lmforge.errors import CheckpointError, ConfigError, LmforgeError

Method = Literal["lora", "adapter", "prefix", "prompt"]
# PEFT/HF module names accepted as LoRA targets, mapped to lmforge's (q/k/v and gate/up are row
# slices of the fused attn.qkv and mlp.w_in).
ALIASES = {
    "q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.out",
    "gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.w_out",
}  # fmt: skip


@dataclass
class LoRAConfig:
    """LoRA (Hu et al. 2021): W + (alpha/r) B A on the target projections, B initialised to 0."""

    r: int = field_(8, "rank", ge=1)
    alpha: float = field_(16.0, "scaling numerator: the update is (alpha / r) * B A", gt=0)
    dropout: float = field_(0.0, "dropout on the LoRA input", ge=0, le=1)
    targets: list[str] = field_(
        ["q", "v"],
        "module name patterns (suffix or regex): q k v out gate up w_out, PEFT names "
        "(q_proj ... down_proj), or 'all-linear'",
    )
    rslora: bool = field_(False, "rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)")


@dataclass
class BottleneckConfig:
    """Adapter tuning (Houlsby et al. 2019): a bottleneck after attention and after the MLP."""

    size: int = field_(16, "bottleneck width", ge=1)


@dataclass
class PrefixConfig:
    """Prefix tuning (Li & Liang 2021): trained key/value prefixes in every layer."""

    n_tokens: int = field_(10, "prefix length", ge=1)
    hidden: int = field_(128, "width of the re-parameterisation MLP (dropped after training)", ge=1)
    init: Literal["tokens", "zero"] = field_(
        "tokens",
        "start at the keys/values the base model computes for real tokens (Li & Liang 2021 "
        "§7.2: init_text, else random vocabulary tokens) or at the MLP's near-zero output",
    )
    init_text: str = field_("", "text whose keys/values start the prefixes (init=tokens)")


@dataclass
class PromptConfig:
    """Prompt tuning (Lester et al. 2021): soft prompt embeddings before the input."""

    n_tokens: int = field_(10, "soft prompt length", ge=1)
    init_text: str = field_("", "initialise from the embeddings of this text ('' : random tokens)")


@dataclass
class PeftConfig:
    """Which parameter-efficient method to train, and its settings."""

    method: Method = field_("lora", "lora, adapter, prefix or prompt")
    lora: LoRAConfig = field_(LoRAConfig(), "LoRA settings")
    adapter: BottleneckConfig = field_(BottleneckConfig(), "adapter tuning settings")
    prefix: PrefixConfig = field_(PrefixConfig(), "prefix tuning settings")
    prompt: PromptConfig = field_(PromptConfig(), "prompt tuning settings")


class PeftState(nn.Module):
    """Holder of all adapters of a model (`model.peft`) and which one is active."""

    def __init__(self, base_sha256: str) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.configs: dict[str, PeftConfig] = {}
        self.handles: dict[str, list] = {}
        self.active: str | None = None
        self.base_sha256 = base_sha256


def _hide_peft(module, state_dict, prefix, local_metadata) -> None:
    # The model's state_dict stays the base's: adapters are saved separately (save_adapter).
    for key in [k for k in state_dict if k.startswith(prefix + "peft.")]:
        del state_dict[key]


def _ignore_missing_peft(module, incompatible) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if ".peft." not in f".{k}"]


def base_sha256(model: nn.Module) -> str:
    """Fingerprint of the base weights, recorded in saved adapters (see model_sha256)."""
    if getattr(model, "peft", None) is not None:
        return model.peft.base_sha256
    from lmforge.evaluation.harness import model_sha256

    return model_sha256(model)


def _state(model: nn.Module) -> PeftState:
    if getattr(model, "peft", None) is None:
        model.peft = PeftState(base_sha256(model))
        model.register_state_dict_post_hook(_hide_peft)
        model.register_load_state_dict_post_hook(_ignore_missing_peft)
    return model.peft


# ---- LoRA ------------------------------------------------------------------------------------
def lora_candidates(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Every LoRA-able projection: name -> (Linear module name, first row, end row). q/k/v and
    gate/up are row slices of the fused layers, so they map 1:1 onto PEFT's q_proj ... up_proj."""
    c = model.config
    q, kv = c.n_heads * c.dim_head, c.kv_heads * c.dim_head
    out = {}
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        out[f"{p}.attn.q"] = (f"{p}.attn.qkv", 0, q)
        out[f"{p}.attn.k"] = (f"{p}.attn.qkv", q, q + kv)
        out[f"{p}.attn.v"] = (f"{p}.attn.qkv", q + kv, q + 2 * kv)
        out[f"{p}.attn.out"] = (f"{p}.attn.out", 0, block.attn.out.out_features)
        if c.mlp == "swiglu":
            ff = c.ff_dim
            out[f"{p}.mlp.gate"] = (f"{p}.mlp.w_in", 0, ff)
            out[f"{p}.mlp.up"] = (f"{p}.mlp.w_in", ff, 2 * ff)
        else:
            out[f"{p}.mlp.w_in"] = (f"{p}.mlp.w_in", 0, block.mlp.w_in.out_features)
        out[f"{p}.mlp.w_out"] = (f"{p}.mlp.w_out", 0, block.mlp.w_out.out_features)
    return out


def match_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Candidate names matched by any pattern (an exact name, a dotted suffix such as "q" or
    "mlp.up", a PEFT alias, a regex, or "all-linear"); an error lists the names if one matches
    nothing."""
    names = list(lora_candidates(model))
    chosen: list[str] = []
    for pattern in patterns:
        if pattern == "all-linear":
            hits = names
        else:
            p = ALIASES.get(pattern, pattern)
            try:
                rx = re.compile(p)
            except re.error:
                rx = None
            hits = [
                n
                for n in names
                if n == p or n.endswith("." + p) or (rx is not None and rx.fullmatch(n))
            ]
        if not hits:
            short = sorted({n.split(".", 2)[2] for n in names})
            raise ConfigError(
                f"LoRA target {pattern!r} matches no module; LoRA-able modules are {short} in "
                f"every block (full names like {names[0]}), or PEFT names {sorted(ALIASES)}"
            )
        chosen += [n for n in hits if n not in chosen]
    return chosen


class LoRALayer(nn.Module):
    """The LoRA update of one Linear: one (A, B) pair per targeted row slice."""

    def __init__(self, linear: nn.Linear, slices: dict[str, tuple[int, int]], cfg: LoRAConfig):
        super().__init__()
        self.slices = dict(sorted(slices.items(), key=lambda kv: kv[1][0]))
        self.scale = cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)
        self.dropout = nn.Dropout(cfg.dropout)
        w = linear.weight
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name, (lo, hi) in self.slices.items():
            a = torch.empty(cfg.r, linear.in_features, dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
            self.A[name] = nn.Parameter(a)
            self.B[name] = nn.Parameter(torch.zeros(hi - lo, cfg.r, dtype=w.dtype, device=w.device))
        self.merged: torch.Tensor | None = None  # the original rows while merged

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.scale * (self.B[name] @ self.A[name])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + s B A x for every slice at once. The slices share their input, so their A's
        stacked make one product; their B's sit on the diagonal of one (out, slices * r) matrix
        (zero rows where no slice is targeted), and one addmm applies it with the scale and the
        residual add folded in: a handful of kernels per layer instead of several per slice."""
        if self.training and self.dropout.p > 0:  # dropout at p = 0 would still copy x
            x = self.dropout(x)
        names = list(self.slices)
        a = torch.cat([self.A[n] for n in names]) if len(names) > 1 else self.A[names[0]]
        blocks, at = [], 0
        for name, (lo, hi) in self.slices.items():
            if lo > at:
                blocks.append(y.new_zeros(lo - at, 0))
            blocks.append(self.B[name])
            at = hi
        if at < y.shape[-1]:
            blocks.append(y.new_zeros(y.shape[-1] - at, 0))
        b = torch.block_diag(*blocks) if len(blocks) > 1 else blocks[0]
        xa = F.linear(x, a).reshape(-1, a.shape[0])
        return torch.addmm(y.reshape(-1, y.shape[-1]), xa, b.t(), alpha=self.scale).view(y.shape)


class LoRAAdapter(nn.Module):
    def __init__(self, model: nn.Module, cfg: LoRAConfig) -> None:
        super().__init__()
        candidates = lora_candidates(model)
        by_module: dict[str, dict[str, tuple[int, int]]] = {}
        for name in match_targets(model, cfg.targets):
            module, lo, hi = candidates[name]
            by_module.setdefault(module, {})[name.rsplit(".", 1)[-1]] = (lo, hi)
        self.layers = nn.ModuleDict(
            {
                m.replace(".", "/"): LoRALayer(model.get_submodule(m), slices, cfg)
                for m, slices in by_module.items()
            }
        )

    def hooks(self, model: nn.Module, is_active) -> list:
        handles = []
        for key, layer in self.layers.items():

            def hook(module, args, out, layer=layer):
                if not is_active() or layer.merged is not None:
                    return out
                return layer(args[0], out)

            handles.append(model.get_submodule(key.replace("/", ".")).register_forward_hook(hook))
        return handles


@torch.no_grad()
def merge_lora(model: nn.Module, name: str | None = None) -> None:
    """Fold the LoRA update into the base weights (W += s B A) for fast inference; the original
    rows are kept so unmerge_lora restores them exactly."""
    adapter = _lora(model, name)
    bases = {key: model.get_submodule(key.replace("/", ".")) for key in adapter.layers}
    # Checked before any weight changes: merging into a quantized base (QLoRA's NF4, int8/int4)
    # would need requantizing W + s B A, which loses the update's precision.
    quantized = [
        k for k, m in bases.items() if type(getattr(m, "weight", None)) is not nn.Parameter
    ]
    if quantized:
        raise LmforgeError(
            f"cannot merge LoRA into a quantized base layer ({quantized[0].replace('/', '.')} is "
            f"{type(bases[quantized[0]]).__name__}): load the fp32 base, load_adapter onto it, "
            "then merge"
        )
    for key, layer in adapter.layers.items():
        if layer.merged is not None:
            continue
        w = bases[key].weight
        layer.merged = w.detach().clone()
        for s, (lo, hi) in layer.slices.items():
            w[lo:hi] += layer.delta_weight(s).to(w.dtype)


@torch.no_grad()
def unmerge_lora(model: nn.Module, name: str | None = None) -> None:
    """Undo merge_lora: the base weights are bit-identical to before."""
    adapter = _lora(model, name)
    for key, layer in adapter.layers.items():
        if layer.merged is not None:
            model.get_submodule(key.replace("/", ".")).weight.copy_(layer.merged)
            layer.merged = None


def _lora(model: nn.Module, name: str | None) -> LoRAAdapter:
    state = _state(model)
    name = name or state.active
    if name not in state.adapters or not isinstance(state.adapters[name], LoRAAdapter):
        raise LmforgeError(f"adapter {name!r} is not a LoRA adapter of this model")
    return state.adapters[name]


# ---- adapter tuning --------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """h + up(gelu(down(h))); up starts at zero so the adapted model starts as the base."""

    def __init__(self, d_model: int, size: int, like: torch.Tensor) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, size, device=like.device, dtype=like.dtype)
        self.up = nn.Linear(size, d_model, device=like.device, dtype=like.dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


class BottleneckAdapter(nn.Module):
    def __init__(self, model: nn.Module, cfg: BottleneckConfig) -> None:
        super().__init__()
        like, d = model.embed.weight, model.config.d_model
        self.attn = nn.ModuleList(Bottleneck(d, cfg.size, like) for _ in model.blocks)
        self.mlp = nn.ModuleList(Bottleneck(d, cfg.size, like) for _ in model.blocks)

    def hooks(self, model: nn.Module, is_active) -> list:
        # Houlsby et al. 2019, Fig. 2: after the attention and the feed-forward sublayers, before
        # the residual addition.
        handles = []
        for i, block in enumerate(model.blocks):
            for module, adapter in ((block.attn, self.attn[i]), (block.mlp, self.mlp[i])):

                def hook(m, args, out, adapter=adapter):
                    return adapter(out) if is_active() else out

                handles.append(module.register_forward_hook(hook))
        return handles


# ---- prefix tuning ---------------------------------------------------------------------------
class _PrefixKV:
    """Stands in for the KV cache argument of one attention layer: puts the prefix keys and
    values in front of the layer's own."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v, self.length = k, v, k.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B = k.shape[0]
        pk = self.k.to(k.dtype).expand(B, -1, -1, -1)
        pv = self.v.to(v.dtype).expand(B, -1, -1, -1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


class PrefixAdapter(nn.Module):
    """Per-layer prefixes P_k, P_v of shape (kv_heads, n_tokens, head_dim). While training they
    are `start` plus an MLP over a small embedding (Li & Liang 2021 §4.3: optimising P directly
    is unstable); `drop_reparam` stores the sum and deletes the MLP.

    `start` holds the keys and values the base model itself computes for real tokens, with the
    MLP's last layer at zero, so training starts from the model reading those tokens first. Li &
    Liang (§7.2) found activations of real words a much better start than random vectors; from
    near-zero prefixes SmolLM2-135M did not learn at all in 30 steps (docs/adapt.md)."""

    def __init__(self, model: nn.Module, cfg: PrefixConfig, tokenizer: Any = None) -> None:
        super().__init__()
        c, like = model.config, model.embed.weight
        # The prefix joins each self-attention as extra keys every query sees: defined for a
        # causal decoder's dense masks (boolean, or additive with ALiBi / T5 bias), not for
        # bidirectional or cross-attention stacks or flex_attention's block masks.
        if (
            getattr(c, "arch", "causal") != "causal"
            or getattr(c, "sparse_kernel", "sdpa") == "flex"
        ):
            raise ConfigError(
                f"prefix tuning needs a causal decoder with dense attention masks; this model has "
                f"arch={c.arch!r}, sparse_kernel={c.sparse_kernel!r}: use LoRA or prompt tuning"
            )
        self.shape = (c.n_layers, 2, c.kv_heads, cfg.n_tokens, c.dim_head)
        n_out = c.n_layers * 2 * c.kv_heads * c.dim_head
        kw = {"device": like.device, "dtype": like.dtype}
        self.embedding = nn.Parameter(torch.randn(cfg.n_tokens, c.d_model, **kw) * c.init_std)
        self.mlp = nn.Sequential(
            nn.Linear(c.d_model, cfg.hidden, **kw), nn.Tanh(), nn.Linear(cfg.hidden, n_out, **kw)
        )
        self.register_buffer("start", torch.zeros(self.shape, **kw))
        if cfg.init == "tokens":
            ids = _init_ids(cfg.init_text, cfg.n_tokens, like.shape[0], tokenizer, "prefix")
            self.start.copy_(_token_keys_values(model, ids))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        self.prefix: nn.Parameter | None = None

    def prefixes(self) -> torch.Tensor:
        if self.prefix is not None:
            return self.prefix
        L, _, KV, P, D = self.shape
        out = self.mlp(self.embedding)  # (P, L * 2 * KV * D)
        return self.start + out.view(P, L, 2, KV, D).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def drop_reparam(self) -> None:
        self.prefix = nn.Parameter(self.prefixes().detach().clone())
        del self.mlp, self.embedding, self.start

    def hooks(self, model: nn.Module, is_active) -> list:
        handles = []
        for i, block in enumerate(model.blocks):

            def hook(module, args, i=i):
                if not is_active():
                    return None
                x, rope, mask, *rest = args
                if rest and rest[0] is not None:
                    raise LmforgeError(
                        "prefix tuning does not run with a KV cache; use "
                        "lmforge.adapt.greedy_generate for generation"
                    )
                p = self.prefixes()[i]
                T, P = x.shape[1], p.shape[2]
                if mask is None:
                    mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
                # Every query sees the whole prefix, then what it saw before: True in a boolean
                # mask, 0 (no bias) in an additive one.
                if mask.dtype == torch.bool:
                    seen = torch.ones(*mask.shape[:-1], P, dtype=torch.bool, device=x.device)
                else:
                    seen = mask.new_zeros(*mask.shape[:-1], P)
                return (x, rope, torch.cat([seen, mask], dim=-1), _PrefixKV(p[0][None], p[1][None]))

            handles.append(block.attn.register_forward_pre_hook(hook))
        return handles


def _init_ids(text: str, n: int, vocab: int, tokenizer: Any, method: str) -> list[int]:
    """n token ids to initialise from: `text` repeated to length n, else fixed random ids."""
    if not text:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (n,), generator=g).tolist()
    if tokenizer is None:
        raise ConfigError(f"{method} tuning from init_text needs the model's tokenizer")
    ids = tokenizer.encode(text)
    if not ids:
        raise ConfigError(f"{method}.init_text encodes to no tokens")
    return (ids * math.ceil(n / len(ids)))[:n]


@torch.no_grad()
def _token_keys_values(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """(n_layers, 2, kv_heads, len(ids), head_dim): the keys and values the plain base model
    caches for `ids` (keys already rotated for positions 0..len-1; prefixes are used as stored)."""
    state = _state(model)
    active, state.active = state.active, None
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(1, len(ids))
        device = model.embed.weight.device
        model(torch.tensor([ids], device=device), cache=cache)
    finally:
        state.active = active
        model.train(was_training)
    return torch.stack([cache.k[:, 0], cache.v[:, 0]], dim=1)


# ---- prompt tuning ---------------------------------------------------------------------------
class PromptAdapter(nn.Module):
    """n_tokens soft embeddings put before the input (virtual tokens); their outputs are cut
    from the logits so callers see logits for their own tokens only."""

    def __init__(self, model: nn.Module, cfg: PromptConfig, tokenizer: Any = None) -> None:
        super().__init__()
        emb = model.embed.weight
        ids = _init_ids(cfg.init_text, cfg.n_tokens, emb.shape[0], tokenizer, "prompt")
        self.init_ids = ids
        self.embedding = nn.Parameter(emb.detach()[torch.tensor(ids, device=emb.device)].clone())
        self._on = False

    def hooks(self, model: nn.Module, is_active) -> list:
        P = self.embedding.shape[0]

        def before(module, args, kwargs):
            if not is_active():
                return None
            if kwargs.get("cache") is not None:
                raise LmforgeError(
                    "prompt tuning does not run with a KV cache; use "
                    "lmforge.adapt.greedy_generate for generation"
                )
            ids = args[0] if args else kwargs.pop("input_ids")
            B = ids.shape[0]
            ids = torch.cat([ids.new_zeros(B, P), ids], dim=1)
            if kwargs.get("attention_mask") is not None:
                am = kwargs["attention_mask"]
                kwargs["attention_mask"] = torch.cat([am.new_ones(B, P), am], dim=1)
            if kwargs.get("position_ids") is not None:
                pos = kwargs["position_ids"]
                start = torch.arange(P, device=pos.device).expand(pos.shape[0], P)
                kwargs["position_ids"] = torch.cat([start, pos + P], dim=1)
            self._on = True
            return (ids, *args[1:]), kwargs

        def embed(module, args, out):
            if not self._on:
                return out
            self._on = False
            soft = self.embedding.to(out.dtype).expand(out.shape[0], -1, -1)
            return torch.cat([soft, out[:, P:]], dim=1)

        def after(module, args, kwargs, out):
            if not is_active() or kwargs.get("logits_to_keep"):
                return out
            if isinstance(out, tuple):
                return tuple(t[:, P:] for t in out)
            return out[:, P:]

        return [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.embed.register_forward_hook(embed),
            model.register_forward_hook(after, with_kwargs=True),
        ]


# ---- the public API --------------------------------------------------------------------------
def add_adapter(
    model: nn.Module, config: PeftConfig, name: str = "default", *, tokenizer: Any = None
) -> nn.Module:
    """Add a trainable adapter `name` to `model` (in place), make it active and freeze the base.
    Returns the adapter module (its parameters are the only trainable ones)."""
    state = _state(model)
    if name in state.adapters:
        raise ConfigError(f"the model already has an adapter named {name!r}")
    if config.method == "lora":
        adapter = LoRAAdapter(model, config.lora)
    elif config.method == "adapter":
        adapter = BottleneckAdapter(model, config.adapter)
    elif config.method == "prefix":
        adapter = PrefixAdapter(model, config.prefix, tokenizer)
    elif config.method == "prompt":
        adapter = PromptAdapter(model, config.prompt, tokenizer)
    else:
        raise ConfigError(
            f"unknown PEFT method {config.method!r}; choose lora, adapter, prefix or prompt"
        )
    state.adapters[name] = adapter
    state.configs[name] = config
    state.handles[name] = adapter.hooks(model, lambda: state.active == name)
    freeze_base(model)
    set_adapter(model, name)
    return adapter


def freeze_base(model: nn.Module) -> None:
    """Only adapter parameters train; the base's stay fixed."""
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.startswith("peft.adapters.") and _active_param(model, pname))


def _active_param(model: nn.Module, pname: str) -> bool:
    return pname.split(".")[2] == model.peft.active if model.peft.active else False


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Activate adapter `name` (None: the plain base model); only its parameters train."""
    state = _state(model)
    if name is not None and name not in state.adapters:
        raise LmforgeError(f"no adapter {name!r}; this model has {sorted(state.adapters)}")
    state.active = name
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.startswith("peft.adapters.") and _active_param(model, pname))


@contextlib.contextmanager
def disabled_adapters(model: nn.Module):
    """Run the plain base model inside the block."""
    state = _state(model)
    active = state.active
    state.active = None
    try:
        yield
    finally:
        state.active = active


def remove_adapter(model: nn.Module, name: str) -> None:
    state = _state(model)
    if name not in state.adapters:
        raise LmforgeError(f"no adapter {name!r}; this model has {sorted(state.adapters)}")
    if isinstance(state.adapters[name], LoRAAdapter):
        unmerge_lora(model, name)
    for h in state.handles.pop(name):
        h.remove()
    del state.adapters[name]
    del state.configs[name]
    if state.active == name:
        state.active = None


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_trainable(model: nn.Module, config: PeftConfig) -> int:
    """The trainable count by formula: LoRA sum r (d_in + d_out) over targets; adapters
    2 L (2 d m + m + d); prefix (training) P d + d h + h + h n + n with n = 2 L kv Dh;
    prompt P d."""
    c = model.config
    if config.method == "lora":
        cand = lora_candidates(model)
        r = config.lora.r
        targets = match_targets(model, config.lora.targets)
        return sum(r * (_d_in(model, cand[t][0]) + cand[t][2] - cand[t][1]) for t in targets)
    if config.method == "adapter":
        m, d = config.adapter.size, c.d_model
        return 2 * c.n_layers * (2 * d * m + m + d)
    if config.method == "prefix":
        P, d, h = config.prefix.n_tokens, c.d_model, config.prefix.hidden
        n = 2 * c.n_layers * c.kv_heads * c.dim_head
        return P * d + d * h + h + h * n + n
    return config.prompt.n_tokens * c.d_model


def _d_in(model: nn.Module, module: str) -> int:
    return model.get_submodule(module).in_features


# ---- saving and loading ----------------------------------------------------------------------
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter.yaml"


def _write_file(path: Path, write) -> None:
    # Write beside the target and rename: a crash never leaves a half-written adapter file.
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_adapter(
    model: nn.Module, directory: str | Path, name: str | None = None, *, base_name: str = ""
) -> Path:
    """Write adapter `name` (default: the active one) as adapter.safetensors + adapter.yaml in
    `directory` (which may hold the base checkpoint too), recording the base model's identity."""
    state = _state(model)
    name = name or state.active
    if name not in state.adapters:
        raise LmforgeError(f"no adapter {name!r} to save; this model has {sorted(state.adapters)}")
    adapter = state.adapters[name]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}
    meta = {
        "format": "lmforge-adapter/1",
        "name": name,
        "method": state.configs[name].method,
        "config": to_dict(state.configs[name]),
        "reparam_dropped": isinstance(adapter, PrefixAdapter) and adapter.prefix is not None,
        "base_model": {
            "name": base_name,
            "sha256": state.base_sha256,
            "config": to_dict(model.config),
            # A QLoRA adapter's base is the quantized checkpoint, not the fp32 model it came from.
            "quantization": _quantization_of(model),
        },
    }
    _write_file(directory / ADAPTER_WEIGHTS, lambda p: save_file(weights, str(p)))
    _write_file(directory / ADAPTER_CONFIG, lambda p: p.write_text(yaml.safe_dump(meta)))
    return directory


def _quantization_of(model: nn.Module) -> dict | None:
    spec = getattr(model, "quantization", None)
    return None if spec is None else to_dict(spec)


def load_adapter(
    model: nn.Module, directory: str | Path, name: str | None = None, *, base_name: str = ""
) -> nn.Module:
    """Put the adapter saved in `directory` onto `model` as `name` (default: its saved name) and
    activate it; an adapter trained on another base model is an error naming both."""
    directory = Path(directory)
    try:
        meta = yaml.safe_load((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        weights = load_file(str(directory / ADAPTER_WEIGHTS))
    except FileNotFoundError as e:
        raise CheckpointError(f"{directory} holds no adapter: {e.filename} is missing") from None
    except (OSError, ValueError, yaml.YAMLError, SafetensorError) as e:
        raise CheckpointError(f"cannot read the adapter in {directory}: {e}") from None
    base = meta["base_model"]
    here = base_sha256(model)
    if base["sha256"] != here:
        raise CheckpointError(
            f"the adapter in {directory} was trained on base model "
            f"{base['name'] or '(unnamed)'} (weights sha256 {base['sha256'][:12]}), not on this "
            f"model {base_name or '(unnamed)'} (weights sha256 {here[:12]})"
        )
    config = from_dict(PeftConfig, meta["config"])
    # The saved weights replace any initialisation (and the tokenizer it would need).
    config.prompt.init_text = config.prefix.init_text = ""
    adapter = add_adapter(model, config, name or meta["name"])
    if meta.get("reparam_dropped"):
        adapter.drop_reparam()
    try:
        adapter.load_state_dict(weights)
    except RuntimeError as e:
        remove_adapter(model, name or meta["name"])
        raise CheckpointError(f"the adapter weights in {directory} do not fit: {e}") from None
    set_adapter(model, name or meta["name"])
    return adapter
