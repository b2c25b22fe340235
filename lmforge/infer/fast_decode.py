"""The engine's decode step in C++ for plain decoder-only models on the CPU (csrc/decode_step.cpp).

Batch-1 decoding of a small model is dominated by per-op overhead, not arithmetic: SmolLM2-135M
runs ~750 tensor ops a token, and from Python each costs several microseconds of interpreter
and module overhead on top of ATen's dispatch. The C++ step issues the same ATen ops as the
Python model (same kernels, same order), so its logits match the model's to fp32 rounding
(tests/infer/test_fast_decode.py compares them), and the engine uses it for every decode step of
a model that qualifies (`unsupported` says why one does not; prefill stays in Python, where the
matmuls dominate).

The extension is compiled on first use with the system's C++ compiler (~20-40 s, once per Python
environment: the build is cached under ~/.cache/lmforge/decode_step/).
Without a compiler, or with LMFORGE_FAST_DECODE=0, the engine runs the Python model; nothing
else changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch
from torch import nn

from lmforge.model.config import PLAIN

log = logging.getLogger("lmforge.fast_decode")
SOURCE = Path(__file__).parent / "csrc" / "decode_step.cpp"
NAME = "lmforge_decode_step"
_ACTS = {"swiglu": 0, "gelu": 1, "geglu": 1, "gelu_tanh": 2, "geglu_tanh": 2, "relu": 3}
_build_lock = threading.Lock()
_extension = None
_build_error: str | None = None


def enabled() -> bool:
    return os.environ.get("LMFORGE_FAST_DECODE", "1") not in ("0", "false", "no")


def build_directory() -> Path:
    """Where the extension is built: one folder per source text, torch version and Python
    environment, so two virtual environments (each compiles against its own torch headers)
    never rebuild each other's copy, and an edited source never meets a stale build."""
    import hashlib

    key = hashlib.sha256(
        b"\0".join(
            [
                SOURCE.read_bytes(),
                torch.__version__.encode(),
                sys.prefix.encode(),
                sys.version.encode(),
            ]
        )
    ).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lmforge" / "decode_step" / key


@contextlib.contextmanager
def _build_guard(directory: Path):
    """Hold an OS file lock while building or loading. PyTorch's own lock is a file that a
    killed build (Ctrl-C during the first compile) leaves behind, after which every later load
    waits for it forever; an flock dies with its process, so whoever holds it knows any such
    file is stale and removes it."""
    try:
        import fcntl
    except ImportError:  # Windows: PyTorch's lock alone
        yield
        return
    with open(directory / "lmforge.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        yield


def extension():
    """The compiled module, building it on first use; None (with the reason logged once) if it
    cannot be built here."""
    global _extension, _build_error
    with _build_lock:
        if _extension is None and _build_error is None:
            try:
                from torch.utils.cpp_extension import load

                directory = build_directory()
                directory.mkdir(parents=True, exist_ok=True)
                with _build_guard(directory):
                    if not (directory / f"{NAME}.so").exists():
                        print(
                            "lmforge: compiling the C++ decode step (once, ~30 s)",
                            file=sys.stderr,
                            flush=True,
                        )
                    _extension = load(
                        NAME, [str(SOURCE)], extra_cflags=["-O2"], build_directory=str(directory)
                    )
            except Exception as e:  # no compiler, no ninja, a broken toolchain: Python decodes
                last = (str(e).strip().splitlines() or [""])[-1]
                _build_error = f"{type(e).__name__}: {last}"
                log.warning("C++ decode step unavailable, decoding in Python (%s)", _build_error)
        return _extension


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _linear(module: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(kind, weight, scale, bias, group) of a linear layer in the C++ step's terms."""
    from lmforge.compress.qlinear import QuantizedLinear

    if isinstance(module, QuantizedLinear):
        if module._kernel_weight is None:
            module._build_kernel_weight()
        kind = 1 if module.bits == 8 else 2
        return kind, module._kernel_weight, module._kernel_scale, module.bias, module.group_size
    return 0, module.weight, torch.empty(0), module.bias, 0


def unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot decode through the C++ step (None: it can)."""
    from lmforge.model import Transformer
    from lmforge.model.layers import RMSNorm

    if type(model) is not Transformer:  # wrappers and subclasses may change forward
        return f"{type(model).__name__} is not a plain Transformer"
    c = model.config
    odd = [k for k, v in PLAIN.items() if getattr(c, k) != v]
    if odd:
        return f"config fields {odd} differ from a plain decoder"
    if c.position not in ("rope", "learned") or c.type_vocab_size:
        return f"position {c.position!r}"
    if c.mlp not in _ACTS:
        return f"mlp {c.mlp!r}"
    if model.training or model.embed.weight.device.type != "cpu":
        return "the model is training or not on the CPU"
    if model.embed.weight.dtype != torch.float32:
        return f"dtype {model.embed.weight.dtype} (the step is fp32)"
    if _global_hooks() or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "the model has forward hooks"
    for i, block in enumerate(model.blocks):
        for name in ("attn_norm", "mlp_norm"):
            if not isinstance(getattr(block, name), (RMSNorm, nn.LayerNorm)):
                return f"blocks.{i}.{name} is neither RMSNorm nor LayerNorm"
        linears = {"attn.qkv": block.attn.qkv, "attn.out": block.attn.out}
        linears |= {"mlp.w_in": block.mlp.w_in, "mlp.w_out": block.mlp.w_out}
        for name, module in linears.items():
            reason = _linear_unsupported(module)
            if reason:
                return f"blocks.{i}.{name}: {reason}"
    if not isinstance(model.norm, (RMSNorm, nn.LayerNorm)):
        return "the final norm is neither RMSNorm nor LayerNorm"
    reason = _linear_unsupported(model.lm_head)
    return f"lm_head: {reason}" if reason else None


def _linear_unsupported(module: nn.Module) -> str | None:
    from lmforge.compress.qlinear import QuantizedLinear
    from lmforge.model.layers import Linear

    if isinstance(module, QuantizedLinear):
        return None if module._kernel_ok(torch.empty(0)) else "no CPU kernel for this layer"
    if type(module) not in (Linear, nn.Linear):  # PEFT wrappers, LLM.int8(), NF4, ...
        return f"a {type(module).__name__}"
    if type(module.weight) is not nn.Parameter or module.weight.dtype != torch.float32:
        return "not a plain fp32 weight"
    return None
    return None


def _norm(norm: nn.Module) -> tuple[bool, torch.Tensor, torch.Tensor | None, float]:
    rms = not isinstance(norm, nn.LayerNorm)
    return rms, norm.weight, None if rms else norm.bias, norm.eps


class FastDecoder:
    """A model's decode step in C++; built once per engine, reading the model's own tensors
    (weights are shared, not copied)."""

    def __init__(self, model: nn.Module, ext) -> None:
        self.model, self._modules = model, list(model.modules())
        c = model.config
        rope = model.rope
        self.step_impl = ext.DecodeStep(
            c.n_heads,
            c.kv_heads,
            c.dim_head,
            _ACTS[c.mlp],
            c.gated_mlp,
            model.embed.weight,
            model.pos_embed.weight if c.position == "learned" else None,
            rope.cos if rope is not None else None,
            rope.sin if rope is not None else None,
        )
        for block in model.blocks:
            a_rms, a_w, a_b, eps = _norm(block.attn_norm)
            _, m_w, m_b, _ = _norm(block.mlp_norm)
            linears = [_linear(m) for m in (block.attn.qkv, block.attn.out)]
            linears += [_linear(m) for m in (block.mlp.w_in, block.mlp.w_out)]
            self.step_impl.add_layer(a_rms, a_w, a_b, m_w, m_b, eps, linears)
        rms, w, b, eps = _norm(model.norm)
        self.step_impl.set_output(rms, w, b, eps, *_linear(model.lm_head))

    def current(self) -> bool:
        """Whether the step still computes what the model's forward would: not while the model
        trains, nor once a forward hook (a PEFT adapter added later, a probe) is on any module.
        Modules replaced after the engine was built (re-quantizing) need a new engine, as the
        huge-page move already does."""
        if self.model.training or _global_hooks():
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in self._modules)

    def step(self, tokens: torch.Tensor, batch) -> torch.Tensor:
        """(B, vocab) logits for one new token per row of the SlotBatch `batch`; writes their
        keys/values and advances its lengths, as the model's forward does."""
        cache = batch.cache
        lengths = cache.lengths[batch.start : batch.stop]
        logits = self.step_impl.step(tokens, lengths, cache.k, cache.v, batch.start)
        batch.advance(1)
        return logits


def fast_decoder(model: nn.Module) -> FastDecoder | None:
    """The C++ decode step for `model`, or None when it does not qualify or cannot be built."""
    if not enabled():
        return None
    reason = unsupported(model)
    if reason is not None:
        log.debug("decoding in Python: %s", reason)
        return None
    ext = extension()
    return FastDecoder(model, ext) if ext is not None else None
