"""The training loop: objective-agnostic, resumable exactly, with metrics and checkpoints.

The loop only sees a model, an objective `(model, batch) -> loss`, and batch sources whose
batches are a pure function of (seed, step, micro_step). That is what makes resume exact and lets
a later stage wrap the model (DDP/FSDP) or switch objectives without touching this file.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn
from tqdm import tqdm

from lmforge.config import field_
from lmforge.errors import CheckpointError, ConfigError
from lmforge.train.checkpoint import load_model, read_model_config, save_model
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.optim import cosine_schedule, make_adamw
from lmforge.train.perf import device_peak_flops


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a training run."""

    steps: int = field_(1000, "optimizer steps", ge=1)
    batch_size: int = field_(8, "sequences per micro-batch", ge=1)
    grad_accum: int = field_(1, "micro-batches per optimizer step", ge=1)
    seq_len: int = field_(256, "tokens per sequence", ge=1)
    lr: float = field_(1e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = field_(0.1, "final lr as a fraction of the peak (cosine)", ge=0, le=1)
    warmup_steps: int = field_(100, "linear warm-up steps", ge=0)
    weight_decay: float = field_(0.1, "AdamW decoupled weight decay on matrices", ge=0)
    betas: tuple[float, float] = field_((0.9, 0.95), "AdamW betas")
    eps: float = field_(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = field_(1.0, "max global gradient norm (0: off)", ge=0)
    precision: Literal["fp32", "bf16"] = field_("fp32", "bf16 autocast (GPUs) or plain fp32")
    compile: bool = field_(False, "torch.compile the model")
    device: str = field_("auto", "cpu, cuda, cuda:N or auto")
    seed: int = field_(0, "seed of model init, data order and dropout")
    eval_every: int = field_(100, "validation every N steps (0: only at the end)", ge=0)
    eval_batches: int = field_(20, "validation batches per evaluation", ge=1)
    save_every: int = field_(500, "checkpoint every N steps (0: only at the end)", ge=0)
    keep_checkpoints: int = field_(2, "how many recent checkpoints to keep", ge=1)
    log_every: int = field_(10, "progress-bar refresh every N steps", ge=1)
    resume: bool = field_(True, "continue from the run directory's latest checkpoint if any")
    time_limit_s: float = field_(
        0.0, "stop (evaluate, save) once training has taken this many seconds (0: no limit)", ge=0
    )

    def validate(self) -> None:
        if self.betas[0] >= 1 or self.betas[1] >= 1 or min(self.betas) < 0:
            raise ConfigError(f"betas must be in [0, 1), got {self.betas}")


class BatchSource(Protocol):
    def get_batch(
        self, batch_size: int, seq_len: int, *, seed: int, step: int, micro_step: int = 0
    ) -> Any: ...

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None) -> Iterator: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    """Runs `config.steps` optimizer steps of `objective` and writes everything to `out_dir`:
    metrics.jsonl, checkpoints/step_N (+ `latest`), and the final model in model/."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: BatchSource,
        out_dir: str | Path,
        *,
        val_data: BatchSource | None = None,
        objective: Callable[[nn.Module, Any], torch.Tensor] = causal_lm_loss,
        tokenizer: Any = None,
        tokens_per_batch: Callable[[Any], int] | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        """`wrap` turns the model into what the training forward calls (e.g. DDP or FSDP2);
        checkpoints and evaluation keep using the plain model."""
        self.config, self.train_data, self.val_data = config, train_data, val_data
        self.objective, self.tokenizer = objective, tokenizer
        self.out_dir = Path(out_dir)
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.forward_model = wrap(self.model) if wrap is not None else self.model
        # Compile model and objective together so the loss (log-softmax over the vocabulary)
        # fuses with the output layer's epilogue instead of running eagerly after the graph.
        self._eager_loss = lambda batch: self.objective(self.forward_model, batch)
        self._loss = torch.compile(self._eager_loss) if config.compile else self._eager_loss
        self._compile_checked = not config.compile
        c = config
        self.optimizer = make_adamw(model, c.lr, c.weight_decay, c.betas, c.eps)
        self.tokens_per_batch = tokens_per_batch or (lambda b: b[0].numel())
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.autocast_dtype = torch.bfloat16 if c.precision == "bf16" else None
        self.peak_flops: float | None = None

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def _write_train_state(self, directory: Path) -> None:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": self.optimizer.state_dict(), "rng": rng}, directory / "state.pt")
        progress = {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed}
        (directory / "progress.json").write_text(json.dumps(progress))

    def save_checkpoint(self) -> Path:
        name = f"step_{self.step:07d}"
        save_model(
            self.model,
            self.ckpt_dir / name,
            tokenizer=self.tokenizer,
            train_state=self._write_train_state,
        )
        latest_tmp = self.ckpt_dir / "latest.tmp"
        latest_tmp.write_text(name)
        latest_tmp.replace(self.ckpt_dir / "latest")
        kept = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())
        for old in kept[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return self.ckpt_dir / name

    def maybe_resume(self) -> bool:
        """Restore weights, optimizer, RNG and step from the latest checkpoint, if there is one."""
        latest = self.ckpt_dir / "latest"
        if not (self.config.resume and latest.is_file()):
            return False
        path = self.ckpt_dir / latest.read_text().strip()
        if read_model_config(path) != self.model.config:
            raise CheckpointError(
                f"cannot resume from {path}: its model config differs from this run's "
                "(use a new --out directory or --train.resume=false)"
            )
        state_file = path / "train_state" / "state.pt"
        try:
            state = torch.load(state_file, weights_only=True, map_location="cpu")
            progress = json.loads((path / "train_state" / "progress.json").read_text())
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot resume: {state_file} is unreadable: {e}") from None
        self.model.load_state_dict(load_model(path).state_dict())
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # e.g. the checkpoint trained other parameters (LoRA vs full)
            raise CheckpointError(
                f"cannot resume from {path}: its optimizer state does not fit this run's "
                f"trainable parameters ({e}); use a new --out directory or --train.resume=false"
            ) from None
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.tokens_seen = progress["step"], progress["tokens_seen"]
        self.elapsed = progress["elapsed"]
        self._truncate_metrics()
        return True

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint we resume from (they will be redone)."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [
            ln
            for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= self.step
        ]
        path.write_text("".join(ln + "\n" for ln in kept))

    # ---- the loop ----------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_loss(self, batch: Any) -> torch.Tensor:
        if self._compile_checked:
            return self._loss(batch)
        try:
            loss = self._loss(batch)
        except Exception as e:  # e.g. no C++ compiler for inductor: train eagerly instead
            print(
                f"torch.compile failed ({type(e).__name__}: {e}); training eagerly", file=sys.stderr
            )
            self._loss = self._eager_loss
            loss = self._loss(batch)
        self._compile_checked = True
        return loss

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the first `eval_batches` sequential windows (eager: a
        compiled graph for evaluation would cost another compilation)."""
        self.model.eval()
        c = self.config
        losses = [
            self.objective(self.model, _to(b, self.device)).item()
            for b in self.val_data.eval_batches(c.batch_size, c.seq_len, c.eval_batches)
        ]
        self.model.train()
        return sum(losses) / max(1, len(losses))

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad norm)."""
        c = self.config
        lr = cosine_schedule(
            self.step,
            peak_lr=c.lr,
            warmup_steps=c.warmup_steps,
            total_steps=c.steps,
            min_lr_ratio=c.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(c.grad_accum):
            batch = self.train_data.get_batch(
                c.batch_size, c.seq_len, seed=c.seed, step=self.step, micro_step=micro
            )
            batch = _to(batch, self.device)
            with self._autocast():
                loss = self._forward_loss(batch)
            (loss / c.grad_accum).backward()
            total += loss.item()
            self.tokens_seen += self.tokens_per_batch(batch)
        if c.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip).item()
        else:
            norm = math.sqrt(
                sum(
                    float(p.grad.pow(2).sum())
                    for p in self.model.parameters()
                    if p.grad is not None
                )
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / c.grad_accum, norm

    def _log(self, record: dict) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self) -> dict:
        """Train to `config.steps`; returns a summary of the run."""
        c = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed_from = self.step if self.maybe_resume() else None
        if self.step == 0:
            torch.manual_seed(c.seed)  # dropout stream; init was seeded by the caller
        flops_per_token = getattr(self.model, "flops_per_token", lambda t: 0.0)(c.seq_len)
        if self.peak_flops is None:
            self.peak_flops = device_peak_flops(self.device, self.autocast_dtype or torch.float32)
        self.model.train()
        val_loss = None
        bar = tqdm(
            total=c.steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=None,
        )
        window_start, window_tokens = time.perf_counter(), 0
        while self.step < c.steps:
            t0, tokens_before = time.perf_counter(), self.tokens_seen
            loss, norm = self.train_step()
            dt = time.perf_counter() - t0
            self.elapsed += dt
            window_tokens += self.tokens_seen - tokens_before
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}")
            tok_s = (self.tokens_seen - tokens_before) / dt
            mfu = flops_per_token * tok_s / self.peak_flops if self.peak_flops else 0.0
            record = {
                "step": self.step,
                "loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": norm,
                "tokens": self.tokens_seen,
                "tok_per_s": tok_s,
                "mfu": mfu,
                "elapsed": self.elapsed,
            }
            out_of_time = 0 < c.time_limit_s <= self.elapsed
            last = self.step == c.steps or out_of_time
            if self.val_data is not None and (
                last or (c.eval_every and self.step % c.eval_every == 0)
            ):
                val_loss = self.evaluate()
                record["val_loss"] = val_loss
            self._log(record)
            bar.update(1)
            if self.step % c.log_every == 0 or last:
                window_rate = window_tokens / (time.perf_counter() - window_start)
                bar.set_postfix(
                    loss=f"{loss:.3f}",
                    tok_s=f"{window_rate:,.0f}",
                    mfu=f"{100 * mfu:.0f}%",
                    refresh=False,
                )
                window_start, window_tokens = time.perf_counter(), 0
            if last or (c.save_every and self.step % c.save_every == 0):
                self.save_checkpoint()
            if out_of_time:
                print(
                    f"time limit of {c.time_limit_s:g}s reached at step {self.step}",
                    file=sys.stderr,
                )
                break
        bar.close()
        if val_loss is None and self.val_data is not None:  # resumed a finished run
            val_loss = self.evaluate()
        save_model(self.model, self.out_dir / "model", tokenizer=self.tokenizer)
        return {
            "steps": self.step,
            "stopped_by_time_limit": self.step < c.steps,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.elapsed,
            "tokens_per_second": self.tokens_seen / max(self.elapsed, 1e-9),
            "final_val_loss": val_loss,
            "resumed_from": resumed_from,
            "flops_per_token": flops_per_token,
            "peak_flops": self.peak_flops,
            "mfu": flops_per_token * self.tokens_seen / max(self.elapsed, 1e-9) / self.peak_flops,
        }
