"""Calibration data for GPTQ and SmoothQuant, and a block-by-block pass that shows every linear
layer its inputs.

The default calibration text is the English corpus every Python install ships
(lmforge.data.default_corpus): the language reference first, so held-out evaluation can use the
standard-library docstrings at the other end of the same corpus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from itertools import islice

import torch
from torch import nn

from lmforge.errors import CorpusError
from lmforge.model.attention import build_mask


def default_texts() -> Iterable[str]:
    from lmforge.data.default_corpus import default_documents

    return (d["text"] for d in default_documents())


def calibration_tokens(
    tokenizer, n_samples: int, seq_len: int, texts: Iterable[str] | None = None
) -> torch.Tensor:
    """(n_samples, seq_len) token ids cut from the concatenated documents (eos between them).
    Fewer tokens than that is an error: too little data gives a rank-deficient Hessian and
    activation ranges that the evaluation data will exceed."""
    if n_samples < 1 or seq_len < 1:
        raise CorpusError(
            f"calibration needs n_samples >= 1 and seq_len >= 1, got {n_samples}, {seq_len}"
        )
    need = n_samples * seq_len
    ids: list[int] = []
    eos = tokenizer.eos_id
    for text in islice(default_texts() if texts is None else texts, 100_000):
        if text and text.strip():
            ids += tokenizer.encode(text) + ([eos] if eos is not None else [])
        if len(ids) >= need:
            break
    if not ids:
        raise CorpusError("calibration data is empty: give at least one non-empty text")
    if len(ids) < need:
        raise CorpusError(
            f"calibration data is too short: {len(ids)} tokens, need n_samples x seq_len = "
            f"{n_samples} x {seq_len} = {need}"
        )
    return torch.tensor(ids[:need]).view(n_samples, seq_len)


Visit = Callable[[str, dict[str, nn.Module], Callable[[], None]], None]


@torch.no_grad()
def blockwise(model, ids: torch.Tensor, names: set[str], visit: Visit, chunk: int = 8) -> None:
    """Run calibration ids through the model one block at a time. For each block (and finally
    the output layer) `visit(prefix, layers, run)` gets the block's linear layers among `names`
    (by full name); calling `run()` feeds the block's current input through it once (forward
    hooks see each layer's input). The block's output, computed after `visit` returns (so with
    any layers it replaced), becomes the next block's input: errors of earlier quantized blocks
    reach later ones, as in GPTQ's sequential scheme."""
    T = ids.shape[1]
    positions = torch.arange(T, device=ids.device)[None]
    rope = model.rope(positions) if model.rope is not None else None
    mask = build_mask(T, 0, None, ids.device)
    xs = []
    for i in range(0, ids.shape[0], chunk):
        x = model.embed(ids[i : i + chunk])
        xs.append(x if model.rope is not None else x + model.pos_embed(positions))

    def layers(prefix: str, module: nn.Module) -> dict[str, nn.Module]:
        found = {f"{prefix}.{n}" if n else prefix: m for n, m in module.named_modules()}
        return {n: m for n, m in found.items() if n in names}

    for b, block in enumerate(model.blocks):
        prefix = f"blocks.{b}"
        visit(prefix, layers(prefix, block), partial(_run, block, xs, rope, mask))
        xs = [model.blocks[b](x, rope, mask) for x in xs]  # the block as replaced by `visit`
    if "lm_head" in names:
        head = nn.Sequential(model.norm, model.lm_head)
        visit("lm_head", {"lm_head": model.lm_head}, partial(_run, head, xs))


def _run(module: nn.Module, xs: list[torch.Tensor], *args) -> None:
    for x in xs:
        module(x, *args)


def record_inputs(layers: dict[str, nn.Module], record: Callable[[str, torch.Tensor], None]):
    """Forward pre-hooks calling record(name, input) for each layer; returns their handles."""
    return [
        m.register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0]))
        for name, m in layers.items()
    ]
