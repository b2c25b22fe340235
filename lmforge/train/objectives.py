"""Training objectives: a function (model, batch) -> mean loss, and the batch sources that turn
token shards into each objective's examples: causal LM, prefix LM, T5 span corruption, UL2's
mixture of denoisers, masked LM with next-sentence prediction (seed 002, 4.2.3; seed 003, 3.1)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import field_
from lmforge.errors import ConfigError, CorpusError
from lmforge.model.layers import _ONEDNN_LINEAR
from lmforge.model.transformer import Transformer

IGNORE_INDEX = -100
# Logit elements per chunk of linear_cross_entropy (128 MiB in fp32; 682 rows of a 49152-token
# vocabulary). Every chunk reads the whole output weight again, so smaller chunks cost speed: on
# the 2-core CPU of docs/benchmarks.md, 512 rows x 49152 in chunks of 64/128/256 rows took
# 1.6/1.5/1.3x the time of one chunk (loss + input gradient; docs/adapt.md, "Measured").
CHUNK_ELEMENTS = 1 << 25


def causal_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy, mean over targets that are not IGNORE_INDEX (seed 002, 4.2.3)."""
    x, y = batch
    return output_loss(model, lambda **kw: model(x, **kw), y)


def output_loss(
    model: nn.Module, run: Callable[..., torch.Tensor], targets: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the model's output against `targets`, mean over those that are not
    IGNORE_INDEX; `run(**kw)` is the model's forward with extra keyword arguments.

    A plain lmforge Transformer skips its output layer (hidden_only) and linear_cross_entropy
    applies it chunk by chunk. A wrapped (DDP/FSDP) or compiling model, or one with forward
    hooks on itself (they may read the logits, like the z-loss), gets the full logits."""
    if _chunked_head_applies(model):
        return linear_cross_entropy(run(hidden_only=True), model.lm_head.weight, targets)
    logits = run()
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _chunked_head_applies(model: nn.Module) -> bool:
    c = getattr(model, "config", None)
    return (
        isinstance(model, Transformer)
        and not model._forward_hooks
        # hidden_only is the output layer's input only for decoders with a plain output layer
        and getattr(c, "arch", "causal") in ("causal", "prefix")
        and getattr(c, "output_scale", 1.0) == 1.0
        and getattr(c, "logit_softcap", None) is None
        and not torch.compiler.is_compiling()  # inductor fuses the plain loss itself
        and type(model.lm_head.weight) is nn.Parameter  # not a sharded or quantized weight
        and model.lm_head.bias is None
    )


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x w^T; oneDNN where the model's Linear uses it too (fp32 on CPU, lmforge.model.layers).
    if _ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets, ignore_index), mean over kept targets,
    without ever holding the (tokens, vocab) fp32 logits or their gradient: rows go through
    the output layer `chunk_rows` at a time (0: CHUNK_ELEMENTS logits per chunk)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows but {t.shape[0]} targets")
    rows = chunk_rows if chunk_rows > 0 else max(1, CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, t, ignore_index, rows)
    return _chunked(h, weight, t, ignore_index, rows, need_h=False, need_w=False)[0]


def _chunked(h, w, t, ignore_index: int, rows: int, *, need_h: bool, need_w: bool):
    """The mean loss and, if asked, its gradients with respect to h and w. Each chunk's logit
    gradient, (softmax - onehot) / n, is formed in place of its logits and used at once, so the
    backward pass never recomputes the logits."""
    kept = t != ignore_index
    n = int(kept.sum())  # the mean's denominator; 0 gives NaN like F.cross_entropy
    row_scale = kept / max(n, 1)  # ignored rows get no gradient
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros_like(w, dtype=torch.float32) if need_w else None
    for start in range(0, h.shape[0], rows):
        hc, keep = h[start : start + rows], kept[start : start + rows]
        tc = torch.where(keep, t[start : start + rows], 0)
        logits = _linear(hc, w).float()
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, tc[:, None]).squeeze(1)
        total += ((lse - picked) * keep).sum()
        if need_h or need_w:
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            grad[torch.arange(len(tc), device=tc.device), tc] -= 1.0
            grad.mul_(row_scale[start : start + rows, None])
            if need_h:
                grad_h[start : start + rows] = _linear(grad.to(w.dtype), w.t())
            if need_w:
                grad_w.addmm_(grad.t(), hc.float())
    grad_w = grad_w.to(w.dtype) if need_w else None
    return total / n if n else total * float("nan"), grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy with its gradients computed chunk by chunk in the forward pass
    (as in the fused linear + cross-entropy of Liger Kernel, Hsu et al. 2024); backward only
    scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, w, t, ignore_index, rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, ctx.grad_h, ctx.grad_w = _chunked(
            h, w, t, ignore_index, rows, need_h=need_h, need_w=need_w
        )
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h = ctx.grad_h * grad_loss.to(ctx.grad_h.dtype) if ctx.grad_h is not None else None
        grad_w = ctx.grad_w * grad_loss.to(ctx.grad_w.dtype) if ctx.grad_w is not None else None
        ctx.grad_h = ctx.grad_w = None
        return grad_h, grad_w, None, None, None


# ==== Pre-training objectives beyond causal LM (seed 002, 4.2.3; seed 003, 3.1) ================
#
# Every objective reads the same token shards: an `ObjectiveBatches` source draws packed windows
# (as causal LM does) and turns each into an objective's example. Batches are dicts of tensors:
#   decoder-only ("prefix" layout): input_ids (B, T), labels (B, T) already shifted by one
#     (labels[:, i] is the token after input_ids[:, i]; IGNORE_INDEX where no loss), prefix_len (B,)
#   encoder-decoder: input_ids, attention_mask (B, Te); decoder_input_ids, decoder_attention_mask,
#     labels (B, Td), with decoder_input_ids = [decoder start] + labels[:-1] (T5: start = pad)
#   masked LM: input_ids, attention_mask, token_type_ids, labels (unshifted) (B, T), and
#     nsp_labels (B,) (0 = B follows A, 1 = B is random, as BertForPreTraining) when NSP is on.
# Each batch is a pure function of (seed, step, micro_step), like TokenShards.get_batch, so a
# resumed run sees the same corruption as an uninterrupted one.

OBJECTIVES = ("causal", "prefix", "span", "ul2", "mlm")
# Special tokens an objective may need, beyond the corpus's own BOS/EOS. Names a tokenizer may
# already define, tried in order; without one a token gets a reserved id at the top of the model's
# vocabulary (below the sentinels), so ids never collide with the corpus's tokens.
SPECIAL_NAMES = {
    "mode_R": ("[NLU]", "[R]"),  # UL2's released checkpoints call the R/S/X modes NLU/S2S/NLG
    "mode_S": ("[S2S]", "[S]"),
    "mode_X": ("[NLG]", "[X]"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "cls": ("[CLS]", "<cls>", "<|cls|>"),
    "sep": ("[SEP]", "<sep>", "<|sep|>"),
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the objectives' special tokens. sentinels[k] marks the k-th corrupted span."""

    sentinels: tuple[int, ...]
    modes: dict[str, int]  # "R" / "S" / "X" -> id
    mask: int
    cls: int
    sep: int
    pad: int
    eos: int
    bos: int | None = None

    @property
    def ids(self) -> frozenset[int]:
        """Every special id: never masked by MLM, never drawn as a random replacement."""
        named = {self.mask, self.cls, self.sep, self.pad, self.eos, *self.modes.values()}
        return frozenset(named | set(self.sentinels) | ({self.bos} - {None}))


def reserved_tokens(n_sentinels: int) -> int:
    """Ids reserved at the top of the vocabulary: the sentinels, then one per SPECIAL_NAMES."""
    return n_sentinels + len(SPECIAL_NAMES)


def special_tokens(
    vocab_size: int,
    *,
    eos_id: int,
    bos_id: int | None = None,
    tokenizer: Any = None,
    n_sentinels: int = 100,
) -> SpecialTokens:
    """Resolve the special ids for a model with `vocab_size` rows.

    Sentinels follow T5 (Raffel et al. 2020): span k is `<extra_id_k>` if the tokenizer has it,
    else id vocab_size - 1 - k, counting down from the end of the vocabulary. The other tokens
    take the tokenizer's own ([MASK], [CLS], ... see SPECIAL_NAMES) or the next reserved ids below
    the sentinels, in SPECIAL_NAMES order. The layout does not depend on the objective, so a model
    keeps its ids when it is trained on with another objective."""
    lookup = tokenizer.token_to_id if tokenizer is not None else (lambda _: None)
    sentinels = tuple(
        (lookup(f"<extra_id_{k}>") if lookup(f"<extra_id_{k}>") is not None else vocab_size - 1 - k)
        for k in range(n_sentinels)
    )
    ids = {}
    for slot, (key, names) in enumerate(SPECIAL_NAMES.items()):
        found = next((lookup(n) for n in names if lookup(n) is not None), None)
        if key == "pad" and found is None and tokenizer is not None:
            found = tokenizer.pad_id
        ids[key] = found if found is not None else vocab_size - 1 - n_sentinels - slot
    if min(sentinels + tuple(ids.values())) < 0:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for {reserved_tokens(n_sentinels)} reserved "
            "special tokens"
        )
    modes = {m: ids.pop(f"mode_{m}") for m in "RSX"}
    return SpecialTokens(sentinels, modes, eos=eos_id, bos=bos_id, **ids)


# ---- T5 span corruption (Raffel et al. 2020, "Exploring the limits of transfer learning") -------
def noise_span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of T5's random_spans_noise_mask for a `length`-token sequence:
    round(length * density) noise tokens (at least 1, at most length - 1) in
    round(noise / mean_span) spans (at least 1). Python's round, like tf.round, halves to even."""
    length = max(length, 2)
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(round(noise / mean_span), 1)
    # Spans alternate non-noise / noise, so both kinds need `spans` tokens at least.
    return noise, min(spans, noise, length - noise)


def span_corruption_lengths(
    length: int, noise_density: float = 0.15, mean_span: float = 3.0
) -> tuple[int, int]:
    """(inputs, targets) lengths after span corruption of `length` tokens, EOS included:
    inputs keep the non-noise tokens plus one sentinel per span, targets hold one sentinel per
    span plus the noise tokens."""
    noise, spans = noise_span_counts(length, noise_density, mean_span)
    return length - noise + spans + 1, noise + spans + 1


def raw_length_for_inputs(
    inputs_length: int, noise_density: float = 0.15, mean_span: float = 3.0
) -> int:
    """The most raw tokens whose corrupted inputs (EOS included) fit `inputs_length`, as T5's
    random_spans_helper (inputs 512 -> 568 raw tokens, 114 targets at density 0.15, span 3)."""
    n = inputs_length
    while span_corruption_lengths(n + 1, noise_density, mean_span)[0] <= inputs_length:
        n += 1
    while n > 2 and span_corruption_lengths(n, noise_density, mean_span)[0] > inputs_length:
        n -= 1
    return n


def random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `n_segments` non-empty pieces of `n_items`, every partition equally likely:
    the cut points are a uniform choice of n_segments - 1 of the n_items - 1 gaps."""
    cuts = np.sort(rng.choice(n_items - 1, n_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean (length,) mask of T5's noise spans: noise_span_counts tokens and spans, spans
    alternating non-noise / noise starting with non-noise, every such mask equally likely."""
    noise, spans = noise_span_counts(length, noise_density, mean_span)
    noise_lengths = random_segmentation(noise, spans, rng)
    keep_lengths = random_segmentation(max(length, 2) - noise, spans, rng)
    runs = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    flags = np.tile([False, True], spans)
    return np.repeat(flags, runs)[:length]


def random_prefix_noise_mask(
    length: int, noise_density: float, rng: np.random.Generator
) -> np.ndarray:
    """The S-denoiser's mask (UL2; T5's random_prefix_noise_mask): a noise suffix of uniform
    random length in [1, about 2 * density * length], so its mean fraction is `noise_density`."""
    most_inputs = length - 1
    least_inputs = min(most_inputs, max(1, round((1 - 2 * noise_density) * length)))
    inputs = int(rng.integers(least_inputs, most_inputs + 1))
    return np.arange(length) >= inputs


def span_corrupt(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinels: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) without EOS: every noise span of `tokens` becomes one sentinel in the
    inputs; the targets list each sentinel followed by the span it replaced."""
    starts = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])
    n_spans = int(starts.sum())
    if n_spans > len(sentinels):
        raise ValueError(f"{n_spans} noise spans but only {len(sentinels)} sentinel tokens")
    marks = np.asarray(sentinels[:n_spans], dtype=tokens.dtype)
    marked = tokens.copy()
    marked[starts] = marks
    inputs = marked[~noise_mask | starts]
    targets = np.insert(tokens[noise_mask], np.flatnonzero(starts[noise_mask]), marks)
    return inputs, targets


# ---- masked LM (Devlin et al. 2019, BERT) -------------------------------------------------------
def mask_tokens(
    ids: np.ndarray,
    maskable: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    replacements: np.ndarray,
    probability: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) for MLM: round(probability * n) of the n maskable positions are chosen
    (as BERT's create_pretraining_data); of those 80% become [MASK], 10% a random id from
    `replacements` and 10% stay unchanged. labels hold the original token at the chosen
    positions and IGNORE_INDEX elsewhere."""
    candidates = np.flatnonzero(maskable)
    k = min(len(candidates), max(1, round(probability * len(candidates))))
    chosen = rng.choice(candidates, k, replace=False) if len(candidates) else candidates
    inputs, labels = ids.copy(), np.full_like(ids, IGNORE_INDEX)
    labels[chosen] = ids[chosen]
    u = rng.random(len(chosen))
    inputs[chosen[u < 0.8]] = mask_id
    swapped = chosen[(u >= 0.8) & (u < 0.9)]
    inputs[swapped] = rng.choice(replacements, len(swapped))
    return inputs, labels


# ---- UL2 mixture of denoisers (Tay et al. 2022, "UL2: Unifying language learning paradigms") ----
# The paper's final mixture of seven: R = regular span corruption (mean span 3 and 8, 15%),
# X = extreme (spans 3/8 at 50%, spans 64 at 15% and 50%), S = sequential (prefix LM, 25% suffix).
UL2_DENOISERS = ("R:3:0.15", "R:8:0.15", "S:0.25", "X:3:0.5", "X:8:0.5", "X:64:0.15", "X:64:0.5")


@dataclass(frozen=True)
class Denoiser:
    """One corruption: T5 span corruption (mean_span > 0) or a prefix-LM split (mean_span 0);
    `mode` is UL2's paradigm token put in front of the inputs (None: no token)."""

    mode: str | None
    noise_density: float
    mean_span: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Denoiser:
        """'R:3:0.15' (mode, mean span, density) or 'S:0.25' (sequential, density)."""
        parts = str(spec).split(":")
        try:
            if parts[0] == "S" and len(parts) == 2:
                return cls("S", float(parts[1]))
            if parts[0] in ("R", "X") and len(parts) == 3:
                return cls(parts[0], float(parts[2]), float(parts[1]))
        except ValueError:
            pass
        raise ValueError(f"denoiser {spec!r}: expected R:mean_span:density, X:... or S:density")


@dataclass
class ObjectiveOptions:
    """Settings of the pre-training objectives other than causal LM."""

    noise_density: float = field_(
        0.15, "span: fraction of tokens corrupted (T5: 0.15)", gt=0, le=0.9
    )
    mean_span: float = field_(3.0, "span: mean length of a corrupted span (T5: 3)", ge=1)
    ul2_denoisers: list[str] = field_(
        list(UL2_DENOISERS), "ul2: denoisers, R:mean_span:density, X:mean_span:density or S:density"
    )
    ul2_weights: list[float] = field_(
        [], "ul2: mixture proportions, one per denoiser (empty: equal, as the paper)"
    )
    mlm_probability: float = field_(0.15, "mlm: fraction of tokens to predict", gt=0, le=1)
    nsp: bool | None = field_(
        None, "mlm: add next-sentence prediction (None: when the model has an NSP head)"
    )
    sentinels: int = field_(100, "sentinel tokens reserved for span corruption (T5: 100)", ge=1)

    def validate(self) -> None:
        try:
            [Denoiser.parse(s) for s in self.ul2_denoisers]
        except ValueError as e:
            raise ConfigError(f"ul2_denoisers: {e}") from None
        if not self.ul2_denoisers:
            raise ConfigError("ul2_denoisers: give at least one denoiser")
        if self.ul2_weights and (
            len(self.ul2_weights) != len(self.ul2_denoisers) or min(self.ul2_weights) < 0
        ):
            raise ConfigError(
                f"ul2_weights: {len(self.ul2_weights)} weights for {len(self.ul2_denoisers)} "
                "ul2_denoisers; give one non-negative weight per denoiser (or none)"
            )


def _decoder_raw_length(d: Denoiser, seq_len: int) -> int:
    """Raw tokens one decoder-only example consumes: [mode] + inputs + targets fill seq_len + 1
    (the extra token is the last target after the shift)."""
    budget = seq_len + 1 - (d.mode is not None)
    if not d.mean_span:
        return budget
    n = budget
    while n > 2 and sum(span_corruption_lengths(n, d.noise_density, d.mean_span)) > budget:
        n -= 1
    return n


def _encoder_raw_length(d: Denoiser, seq_len: int) -> int:
    """Raw tokens one encoder-decoder example consumes: [mode] + inputs fill seq_len (T5)."""
    room = seq_len - (d.mode is not None)
    if not d.mean_span:
        return room + 1  # the inputs keep at most n - 1 tokens
    return raw_length_for_inputs(room, d.noise_density, d.mean_span)


def _max_targets(d: Denoiser, n: int) -> int:
    if not d.mean_span:
        return n - min(n - 1, max(1, round((1 - 2 * d.noise_density) * n)))
    return span_corruption_lengths(n, d.noise_density, d.mean_span)[1]


class ObjectiveBatches:
    """A batch source (Trainer's BatchSource) giving `objective`'s examples from token shards.

    Layouts: "decoder" (causal and prefix decoders: span/UL2 become a prefix LM over
    inputs + targets, as UL2 trains decoder-only models), "encoder_decoder" (inputs to the
    encoder, targets to the decoder) and "encoder" (masked LM)."""

    EVAL_SEED = 0x5EED

    def __init__(
        self,
        shards: Any,
        objective: str,
        layout: Literal["decoder", "encoder_decoder", "encoder"],
        specials: SpecialTokens,
        options: ObjectiveOptions | None = None,
        *,
        nsp: bool = False,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
        self.shards, self.objective, self.layout = shards, objective, layout
        self.specials, self.options = specials, options or ObjectiveOptions()
        self.nsp = nsp
        o = self.options
        if objective == "span":
            self.denoisers = [Denoiser(None, o.noise_density, o.mean_span)]
        elif objective == "ul2":
            self.denoisers = [Denoiser.parse(s) for s in o.ul2_denoisers]
        elif objective == "prefix":
            self.denoisers = [Denoiser(None, 0.5)]  # split point uniform over the window
        else:
            self.denoisers = []
        weights = np.asarray(
            o.ul2_weights if objective == "ul2" and o.ul2_weights else [1.0] * len(self.denoisers),
            dtype=float,
        )
        self.weights = weights / weights.sum() if len(weights) else weights
        # Random MLM replacements come from the corpus's own ids, never a special token.
        vocab = np.arange(shards.vocab_size)
        self.replacements = vocab[~np.isin(vocab, list(specials.ids))]

    @staticmethod
    def tokens_in(batch: Any) -> int:
        """Tokens a batch feeds the model (encoder plus decoder), for throughput and tokens_seen."""
        if isinstance(batch, (tuple, list)):
            return batch[0].numel()
        return batch["input_ids"].numel() + (
            batch["decoder_input_ids"].numel() if "decoder_input_ids" in batch else 0
        )

    def get_batch(
        self, batch_size: int, seq_len: int, *, seed: int, step: int, micro_step: int = 0
    ) -> Any:
        """A pure function of (seed, step, micro_step), like TokenShards.get_batch."""
        return self.make(batch_size, seq_len, np.random.default_rng([seed, step, micro_step]))

    def eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[Any]:
        """The same `max_batches` batches at every evaluation (fixed seed); without a count,
        about one pass over the split's tokens."""
        count = max_batches or max(1, self.shards.n_tokens // (batch_size * seq_len))
        for i in range(count):
            yield self.make(batch_size, seq_len, np.random.default_rng([self.EVAL_SEED, i]))

    def make(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> Any:
        if self.objective == "mlm":
            return self._masked_lm(batch_size, seq_len, rng)
        if self.objective == "causal":
            _, _, w = self._windows(rng, batch_size, seq_len + 1)
            t = torch.from_numpy(w)
            return t[:, :-1].contiguous(), t[:, 1:].contiguous()
        raw = _encoder_raw_length if self.layout == "encoder_decoder" else _decoder_raw_length
        lengths = [raw(d, seq_len) for d in self.denoisers]
        picks = rng.choice(len(self.denoisers), batch_size, p=self.weights)
        _, _, w = self._windows(rng, batch_size, max(lengths))
        pairs = [
            self._corrupt(w[b, : lengths[k]], self.denoisers[k], rng) for b, k in enumerate(picks)
        ]
        if self.layout == "encoder_decoder":
            most = max(_max_targets(d, n) for d, n in zip(self.denoisers, lengths))
            return self._encoder_decoder(pairs, seq_len, most)
        return self._prefix_lm(pairs, seq_len)

    def _corrupt(self, tokens: np.ndarray, d: Denoiser, rng) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of one example, [mode] in front of the inputs."""
        s = self.specials
        mode = [s.modes[d.mode]] if d.mode else []
        if not d.mean_span:
            if self.objective == "prefix":  # T5's prefix_lm: a uniform split point
                cut = int(rng.integers(1, len(tokens)))
            else:
                cut = int(np.argmax(random_prefix_noise_mask(len(tokens), d.noise_density, rng)))
            return np.concatenate([mode, tokens[:cut]]).astype(np.int64), tokens[cut:]
        noise = random_spans_noise_mask(len(tokens), d.noise_density, d.mean_span, rng)
        inputs, targets = span_corrupt(tokens, noise, s.sentinels)
        # T5 ends both inputs and targets with EOS.
        return np.concatenate([mode, inputs, [s.eos]]).astype(np.int64), np.append(targets, s.eos)

    def _prefix_lm(self, pairs, seq_len: int) -> dict[str, torch.Tensor]:
        """Decoder-only rows: inputs + targets, shifted by one, loss on the targets only."""
        B = len(pairs)
        ids = np.full((B, seq_len), self.specials.pad, dtype=np.int64)
        labels = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
        prefix = np.zeros(B, dtype=np.int64)
        for b, (inputs, targets) in enumerate(pairs):
            row = np.concatenate([inputs, targets])
            n = len(row) - 1
            ids[b, :n] = row[:-1]
            labels[b, len(inputs) - 1 : n] = row[len(inputs) :]
            prefix[b] = len(inputs)
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "prefix_len": torch.from_numpy(prefix),
        }

    def _encoder_decoder(self, pairs, seq_len: int, target_len: int) -> dict[str, torch.Tensor]:
        """Encoder rows padded to seq_len, decoder rows to target_len; the decoder reads
        [start] + targets[:-1] (teacher forcing) with T5's start token, the pad id."""
        B, pad = len(pairs), self.specials.pad
        enc = np.full((B, seq_len), pad, dtype=np.int64)
        dec = np.full((B, target_len), pad, dtype=np.int64)
        labels = np.full((B, target_len), IGNORE_INDEX, dtype=np.int64)
        for b, (inputs, targets) in enumerate(pairs):
            enc[b, : len(inputs)] = inputs
            labels[b, : len(targets)] = targets
            dec[b, 1 : len(targets)] = targets[:-1]
        enc_t, dec_t = torch.from_numpy(enc), torch.from_numpy(dec)
        return {
            "input_ids": enc_t,
            "attention_mask": torch.from_numpy(
                np.arange(seq_len)[None] < np.array([len(i) for i, _ in pairs])[:, None]
            ).long(),
            "decoder_input_ids": dec_t,
            "decoder_attention_mask": torch.from_numpy(
                np.arange(target_len)[None] < np.array([len(t) for _, t in pairs])[:, None]
            ).long(),
            "labels": torch.from_numpy(labels),
        }

    # ---- masked LM + next-sentence prediction ----
    def _masked_lm(self, B: int, seq_len: int, rng) -> dict[str, torch.Tensor]:
        """[CLS] A [SEP] B [SEP] rows (BERT). With NSP, A is the tail of one document up to a
        random cut and B is either the text after the cut in the same document (label 0) or a
        piece of another document (label 1), each half the time; without NSP a row is
        [CLS] window [SEP]. Then MLM masking over everything but the special tokens."""
        s = self.specials
        budget = seq_len - (3 if self.nsp else 2)
        which, offsets, w = self._windows(rng, B, budget)
        ids = np.full((B, seq_len), s.pad, dtype=np.int64)
        types = np.zeros((B, seq_len), dtype=np.int64)
        real = np.zeros((B, seq_len), dtype=bool)
        nsp = np.zeros(B, dtype=np.int64)
        for b in range(B):
            if not self.nsp:
                row, n_a = np.concatenate([[s.cls], w[b], [s.sep]]), len(w[b]) + 2
            else:
                a_seg, b_seg, nsp[b] = self._segment_pair(rng, which[b], offsets[b], w[b])
                row = np.concatenate([[s.cls], a_seg, [s.sep], b_seg, [s.sep]])
                n_a = len(a_seg) + 2
            ids[b, : len(row)], real[b, : len(row)] = row, True
            types[b, n_a : len(row)] = 1
        maskable = real & ~np.isin(ids, list(s.ids))
        inputs, labels = np.empty_like(ids), np.empty_like(ids)
        for b in range(B):
            inputs[b], labels[b] = mask_tokens(
                ids[b],
                maskable[b],
                rng,
                mask_id=s.mask,
                replacements=self.replacements,
                probability=self.options.mlm_probability,
            )
        batch = {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy(real).long(),
            "token_type_ids": torch.from_numpy(types),
            "labels": torch.from_numpy(labels),
        }
        if self.nsp:
            batch["nsp_labels"] = torch.from_numpy(nsp)
        return batch

    def _segment_pair(self, rng, shard: int, offset: int, window: np.ndarray):
        """(A, B, label): A and B split one window at a random cut, each trimmed to the
        document of the cut; for label 1, B is replaced by text of a different document."""
        eos, budget = self.specials.eos, len(window)
        for _ in range(8):  # a cut right beside an EOS leaves A or B empty: try another
            cut = int(rng.integers(1, budget))
            a_seg = window[:cut][_after_last(window[:cut], eos) :]
            b_seg = window[cut:][: _first(window[cut:], eos)]
            if len(a_seg) and len(b_seg):
                break
        if rng.random() < 0.5:
            return a_seg, b_seg, 0
        a_doc = _doc_start(self.shards.shards[shard], offset + cut - 1, eos)
        room = budget - len(a_seg)
        for _ in range(8):
            (other,), (start,), (piece,) = self._windows(rng, 1, room)
            b_seg = piece[: _first(piece, eos)]
            same = other == shard and _doc_start(self.shards.shards[other], start, eos) == a_doc
            if len(b_seg) and not same:
                break
        return a_seg, b_seg, 1

    def _windows(self, rng, batch_size: int, length: int):
        """(shard, offset, tokens) of `batch_size` random windows of `length` tokens, every
        window inside one shard equally likely (TokenShards.get_batch's draw, with offsets)."""
        lengths = self.shards.lengths
        starts = np.maximum(lengths - length + 1, 0)
        if starts.sum() == 0:
            raise CorpusError(
                f"the {self.shards.split!r} split has no shard of {length} tokens, which one "
                f"{self.objective} example needs at this seq_len: add data or lower seq_len"
            )
        picks = rng.integers(0, starts.sum(), size=batch_size)
        bounds = np.cumsum(starts)
        which = np.searchsorted(bounds, picks, side="right")
        offsets = picks - (bounds[which] - starts[which])
        tokens = np.stack(
            [self.shards.shards[s][o : o + length] for s, o in zip(which, offsets)]
        ).astype(np.int64)
        return which, offsets, tokens


def _first(tokens: np.ndarray, value: int) -> int:
    """Index of the first `value` in tokens, or len(tokens)."""
    hits = np.flatnonzero(tokens == value)
    return int(hits[0]) if len(hits) else len(tokens)


def _after_last(tokens: np.ndarray, value: int) -> int:
    """Index just after the last `value` in tokens, or 0."""
    hits = np.flatnonzero(tokens == value)
    return int(hits[-1]) + 1 if len(hits) else 0


def _doc_start(shard: np.ndarray, position: int, eos: int, chunk: int = 4096) -> int:
    """Offset of the first token of the document holding `position` (just after the previous
    EOS, or 0): a document is known by where it starts."""
    end = position
    while end > 0:
        begin = max(0, end - chunk)
        hits = np.flatnonzero(shard[begin:end] == eos)
        if len(hits):
            return begin + int(hits[-1]) + 1
        end = begin
    return 0


# ---- losses -------------------------------------------------------------------------------------
def _arch(model: nn.Module) -> str:
    inner = getattr(model, "module", model)  # DDP wraps the model; FSDP2 keeps its class
    return getattr(inner.config, "arch", "causal")


def prefix_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on the continuation only (labels are IGNORE_INDEX over the
    prefix). A prefix decoder attends bidirectionally within each row's prefix_len; a causal
    decoder reads the same rows causally (UL2 trains both this way)."""
    extra = {"prefix_len": batch["prefix_len"]} if _arch(model) == "prefix" else {}
    return output_loss(
        model, lambda **kw: model(batch["input_ids"], **extra, **kw), batch["labels"]
    )


def seq2seq_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Encoder-decoder cross-entropy of the decoder's predictions against `labels` (T5)."""

    def run(**kw):
        return model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
            decoder_attention_mask=batch["decoder_attention_mask"],
            **kw,
        )

    return output_loss(model, run, batch["labels"])


def masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """MLM cross-entropy over the chosen positions, plus next-sentence prediction's
    cross-entropy when the batch has nsp_labels (BERT pre-trains on their sum)."""
    nsp = "nsp_labels" in batch
    out = model(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
        return_hidden=nsp,
    )
    logits, hidden = out if nsp else (out, None)
    labels = batch["labels"]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    if nsp:
        nsp_logits = getattr(model, "module", model).nsp_logits(hidden)
        loss = loss + F.cross_entropy(nsp_logits.float(), batch["nsp_labels"])
    return loss


def objective_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss of any ObjectiveBatches batch, told apart by its keys."""
    if isinstance(batch, (tuple, list)):
        return causal_lm_loss(model, batch)
    if "token_type_ids" in batch:
        return masked_lm_loss(model, batch)
    if "decoder_input_ids" in batch:
        return seq2seq_loss(model, batch)
    return prefix_lm_loss(model, batch)


def check_objective(objective: str, model_config: Any, options: ObjectiveOptions) -> bool:
    """Fail, naming both settings, when the objective cannot train this architecture; return
    whether next-sentence prediction is on."""
    arch = getattr(model_config, "arch", "causal")
    if objective == "mlm" and arch != "encoder":
        raise ConfigError(
            f"objective='mlm' (masked LM / NSP) needs model.arch='encoder', got "
            f"model.arch={arch!r}: a decoder cannot see the tokens after a [MASK]"
        )
    if arch == "encoder" and objective != "mlm":
        raise ConfigError(
            f"model.arch='encoder' trains with objective='mlm' only, got objective={objective!r}"
        )
    if arch == "encoder_decoder" and objective == "causal":
        raise ConfigError(
            "objective='causal' has no source text for model.arch='encoder_decoder'; use "
            "objective=prefix, span or ul2"
        )
    has_head = bool(getattr(model_config, "nsp_head", False))
    if options.nsp and not has_head:
        raise ConfigError(
            "objective_options.nsp=true needs a next-sentence head: set model.nsp_head=true "
            f"(model.arch={arch!r})"
        )
    return objective == "mlm" and (has_head if options.nsp is None else options.nsp)


def objective_batches(
    objective: str,
    model_config: Any,
    shards: Any,
    *,
    tokenizer: Any = None,
    options: ObjectiveOptions | None = None,
) -> ObjectiveBatches:
    """The batch source of `objective` for a model of `model_config` reading `shards`; the
    special tokens come from the tokenizer or the top of model_config.vocab_size."""
    options = options or ObjectiveOptions()
    nsp = check_objective(objective, model_config, options)
    arch = getattr(model_config, "arch", "causal")
    layout = {"encoder": "encoder", "encoder_decoder": "encoder_decoder"}.get(arch, "decoder")
    specials = special_tokens(
        model_config.vocab_size,
        eos_id=shards.eos_id,
        bos_id=shards.index.get("bos_id"),
        tokenizer=tokenizer,
        n_sentinels=options.sentinels,
    )
    needs_specials = objective in ("span", "ul2", "mlm") or layout == "encoder_decoder"
    lowest = model_config.vocab_size - reserved_tokens(options.sentinels)
    if needs_specials and lowest < shards.vocab_size:
        raise ConfigError(
            f"objective={objective!r} reserves {reserved_tokens(options.sentinels)} special "
            f"tokens at the top of the vocabulary, above the data's {shards.vocab_size}: set "
            f"--model.vocab_size={shards.vocab_size + reserved_tokens(options.sentinels)} (or "
            "lower objective_options.sentinels)"
        )
    return ObjectiveBatches(shards, objective, layout, specials, options, nsp=nsp)
