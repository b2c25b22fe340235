"""The training loop: objective-agnostic, resumable exactly, with metrics and checkpoints.

The loop only sees a model, an objective `(model, batch) -> loss`, and batch sources whose
batches are a pure function of (seed, step, micro_step). That is what makes resume exact and lets
a later stage wrap the model (DDP/FSDP) or switch objectives without touching this file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn
from tqdm import tqdm

from lmforge.config import field_
from lmforge.errors import CheckpointError, ConfigError
from lmforge.train import distributed, loggers
from lmforge.train.checkpoint import (
    TRAIN_STATE_DIR,
    commit_directory,
    load_model,
    read_model_config,
    save_model,
    write_model_files,
)
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.optim import learning_rate, make_optimizer, ramped_micro_batches
from lmforge.train.perf import device_peak_flops, peak_memory_bytes
from lmforge.train.recompute import apply_recomputation
from lmforge.train.stability import SpikeDetector, TrainingDivergedError, ZLoss
from lmforge.train.tensor_parallel import apply_tensor_parallel, reorder_state_dict

ZERO1_STATE = "optimizer_zero1.pt"  # ZeRO-1's consolidated optimizer state, in TRAIN_STATE_DIR


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a training run."""

    steps: int = field_(1000, "optimizer steps", ge=1)
    batch_size: int = field_(8, "sequences per micro-batch (per process)", ge=1)
    grad_accum: int = field_(
        1, "micro-batches per optimizer step per process (when global_batch_size is 0)", ge=1
    )
    global_batch_size: int = field_(
        0,
        "sequences per optimizer step over all processes; must be a multiple of batch_size x "
        "world size, the accumulation follows (0: batch_size x grad_accum x world size)",
        ge=0,
    )
    batch_ramp_start: int = field_(
        0, "batch-size ramp-up: initial global batch in sequences (0: no ramp-up)", ge=0
    )
    batch_ramp_tokens: int = field_(
        0, "batch-size ramp-up: tokens over which the batch grows linearly to its full size", ge=0
    )
    seq_len: int = field_(256, "tokens per sequence", ge=1)
    optimizer: Literal["adamw", "adafactor", "lamb", "adamw8bit", "lion"] = field_(
        "adamw", "optimizer (adamw8bit: block-wise 8-bit states; lion wants a 3-10x lower lr)"
    )
    lr: float = field_(1e-3, "peak learning rate", gt=0)
    schedule: Literal["cosine", "wsd", "constant"] = field_(
        "cosine", "lr after warm-up: cosine decay, warm-up-stable-decay, or constant"
    )
    min_lr_ratio: float = field_(
        0.1, "final lr as a fraction of the peak (cosine, wsd)", ge=0, le=1
    )
    decay_fraction: float = field_(
        0.2, "wsd: fraction of the steps spent in the final decay", gt=0, le=1
    )
    warmup_steps: int = field_(100, "linear warm-up steps", ge=0)
    weight_decay: float = field_(0.1, "decoupled weight decay on matrices", ge=0)
    betas: tuple[float, float] = field_((0.9, 0.95), "AdamW/LAMB/Lion betas")
    eps: float = field_(1e-8, "AdamW/LAMB epsilon", gt=0)
    grad_clip: float = field_(1.0, "max global gradient norm (0: off)", ge=0)
    z_loss: float = field_(0.0, "weight of PaLM's z-loss, w * log^2 Z (PaLM: 1e-4; 0: off)", ge=0)
    max_nonfinite_steps: int = field_(
        10, "skip steps whose loss or gradient is inf/NaN; stop after this many", ge=0
    )
    spike_factor: float = field_(
        0.0, "loss-spike detection: loss above factor x running median (0: off; e.g. 2)", ge=0
    )
    spike_window: int = field_(50, "steps in the running median of the loss", ge=1)
    spike_rollback_steps: int = field_(
        100, "on a spike, restore the newest checkpoint at least this many steps back", ge=0
    )
    spike_skip_batches: int = field_(200, "on a spike, then skip this many data batches", ge=0)
    max_spike_restarts: int = field_(5, "stop with an error after this many rollbacks", ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = field_(
        "fp32",
        "bf16 autocast (GPUs), fp16 autocast with dynamic loss scaling (GPUs without bf16), or "
        "plain fp32",
    )
    compile: bool = field_(False, "torch.compile the model")
    recompute: Literal["none", "full", "selective"] = field_(
        "none", "activation recomputation: every block (full) or every k-th (selective)"
    )
    recompute_every: int = field_(2, "selective recomputation: every k-th block", ge=1)
    parallel: Literal["ddp", "fsdp", "tp", "pp"] = field_(
        "ddp",
        "with several processes: DDP, FSDP2 (ZeRO-3) sharding, tensor parallel (every rank "
        "holds a slice of each block's heads and MLP) or pipeline parallel (every rank is one "
        "stage of n_layers/world blocks, 1F1B schedule); tp and pp ranks read the same data",
    )
    zero1: bool = field_(
        False, "DDP: shard the optimizer state across ranks (ZeRO-1, ZeroRedundancyOptimizer)"
    )
    fsdp_replicate: int = field_(
        1, "FSDP2: replica groups (> 1: hybrid sharding within groups of world/N ranks)", ge=1
    )
    dist_timeout_s: float = field_(
        600.0, "seconds a collective may wait before the rank fails with an error", gt=0
    )
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
    log_tensorboard: bool = field_(
        False, "also log the metrics to TensorBoard (out/tensorboard; needs `tensorboard`)"
    )
    log_wandb: bool = field_(
        False, "also log the metrics to Weights & Biases (needs `wandb`; WANDB_MODE=offline works)"
    )

    def validate(self) -> None:
        if self.betas[0] >= 1 or self.betas[1] >= 1 or min(self.betas) < 0:
            raise ConfigError(f"betas must be in [0, 1), got {self.betas}")
        if self.global_batch_size and self.global_batch_size % self.batch_size:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not a multiple of "
                f"batch_size={self.batch_size}"
            )
        if self.batch_ramp_start and not self.batch_ramp_tokens:
            raise ConfigError("batch_ramp_start needs batch_ramp_tokens > 0 (the ramp's length)")
        if 0 < self.spike_factor <= 1:
            raise ConfigError(
                f"spike_factor={self.spike_factor} would flag ordinary losses; use a factor > 1 "
                "(or 0 to turn detection off)"
            )
        if self.spike_factor and not self.save_every:
            raise ConfigError(
                "spike_factor needs save_every > 0: a spike rolls back to a saved checkpoint"
            )
        if (
            self.spike_factor
            and self.save_every * self.keep_checkpoints <= self.spike_rollback_steps
        ):
            raise ConfigError(
                f"keep_checkpoints={self.keep_checkpoints} x save_every={self.save_every} do not "
                f"reach spike_rollback_steps={self.spike_rollback_steps} back; keep more checkpoints"
            )


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


@contextlib.contextmanager
def _single_process_dcp():
    """torch.distributed.checkpoint warns on every call without a process group; that is our
    normal single-process case (no_dist=True), not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Trainer:
    """Runs `config.steps` optimizer steps of `objective` and writes everything to `out_dir`:
    metrics.jsonl, checkpoints/step_N (+ `latest`), and the final model in model/.

    Under torchrun every rank builds the same Trainer: the model is wrapped for data parallelism
    (train.parallel), each rank draws its own micro-batches, and only rank 0 logs and writes."""

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
        """`wrap` turns the model into what the training forward calls (by default DDP or FSDP2
        when there are several processes); checkpoints and evaluation use the plain model."""
        self.config, self.train_data, self.val_data = config, train_data, val_data
        self.objective, self.tokenizer = objective, tokenizer
        self.out_dir = Path(out_dir)
        c = config
        self.env = distributed.current()
        # Tensor and pipeline parallel ranks share one data stream; otherwise every rank is a
        # data replica.
        self.tensor_parallel = self.env.world_size if wrap is None and c.parallel == "tp" else 1
        pipelined = wrap is None and self.env.active and c.parallel == "pp"
        self.pipeline_stages = self.env.world_size if pipelined else 1
        self.model_parallel = self.tensor_parallel * self.pipeline_stages
        self.data_rank = self.env.rank // self.model_parallel
        self.data_ranks = self.env.world_size // self.model_parallel
        # Checked before any wrapper: a bad world size fails on every rank alike, before the
        # first collective.
        self.micro_batches = distributed.micro_batches_per_rank(
            c.global_batch_size, c.batch_size, c.grad_accum, self.data_ranks
        )
        self.device = resolve_device(distributed.process_device(c.device, self.env))
        self.model = model.to(self.device)
        self.recomputed_blocks = apply_recomputation(self.model, c.recompute, c.recompute_every)
        self.sharded = wrap is None and self.env.active and c.parallel == "fsdp"
        if (self.sharded or self.tensor_parallel > 1) and c.optimizer == "adamw8bit":
            raise ConfigError(
                "train.optimizer=adamw8bit quantizes whole tensors and cannot run on FSDP2 or "
                "tensor-parallel shards; use train.parallel=ddp or another optimizer"
            )
        if c.precision == "fp16" and (self.sharded or self.tensor_parallel > 1):
            raise ConfigError(
                "train.precision=fp16 scales gradients that FSDP2 and tensor parallel split "
                "across ranks, where each rank's overflow check would see only its shard; use "
                "bf16 there (or fp16 with train.parallel=ddp)"
            )
        self.zero1 = c.zero1 and wrap is None and self.env.active
        if self.zero1 and c.parallel != "ddp":
            raise ConfigError(
                f"train.zero1 shards the optimizer state of DDP; train.parallel={c.parallel} "
                "already shards (fsdp) or splits (tp, pp) it: turn zero1 off"
            )
        self.pipeline = None
        if pipelined:
            self._check_pipeline_options()
        if wrap is not None:
            self.forward_model = wrap(self.model)
        elif pipelined:
            from lmforge.train.pipeline import Pipeline

            self.pipeline = Pipeline(self.model, self.device, self.micro_batches)
            self.forward_model = self.model
        elif self.tensor_parallel > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (self.tensor_parallel,))
            apply_tensor_parallel(self.model, mesh)
            self.forward_model = self.model
        else:
            self.forward_model = distributed.parallelize(
                self.model,
                c.parallel,
                self.env,
                replicate=c.fsdp_replicate,
                param_dtype=torch.bfloat16 if c.precision == "bf16" else None,
            )
        self.z_loss = ZLoss(self.model, c.z_loss)
        # Compile model and objective together so the loss (log-softmax over the vocabulary)
        # fuses with the output layer's epilogue instead of running eagerly after the graph.
        self._eager_loss = lambda batch: self.objective(self.forward_model, batch)
        self._loss = torch.compile(self._eager_loss) if c.compile else self._eager_loss
        self._compile_checked = not c.compile
        self.optimizer = make_optimizer(
            c.optimizer,
            self.pipeline.stage if self.pipeline else self.model,  # a stage trains its own part
            lr=c.lr,
            weight_decay=c.weight_decay,
            betas=c.betas,
            eps=c.eps,
            per_tensor=self.tensor_parallel > 1,
        )
        if self.zero1:
            self.optimizer = distributed.shard_optimizer_state(self.optimizer)
        self.tokens_per_batch = tokens_per_batch or (lambda b: b[0].numel())
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        # (step, n): from optimizer step `step` on, the data stream is n batches further ahead.
        self.data_skips: list[tuple[int, int]] = []
        self.nonfinite_steps = 0
        self.spike_restarts = 0
        self.spikes = SpikeDetector(c.spike_factor, c.spike_window)
        self.last_step_skipped: str | None = None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.precision)
        # fp16's 5-bit exponent underflows small gradients: scale the loss up before backward
        # and the gradients down before the update, the scale found dynamically (Micikevicius
        # et al. 2018, "Mixed precision training"). bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type) if c.precision == "fp16" else None
        self.overflow_steps = 0
        self.peak_flops: float | None = None
        loggers.check_available(c.log_tensorboard, c.log_wandb)  # on every rank: fail alike
        self.sinks: loggers.MetricSinks | None = None

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def _trained(self) -> nn.Module:
        """The module whose parameters this rank's optimizer updates (a pipeline stage names
        them as the model does)."""
        return self.pipeline.stage if self.pipeline is not None else self.model

    def _optimizer_options(self):
        """Pipeline stages hold different parameters: key the optimizer state and the groups'
        settings by parameter name (flattened), not by group index, which
        torch.distributed.checkpoint would take for the same entry on every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=self.pipeline is not None)

    def _trainable_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def _full_weights(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (gathered from FSDP2 or tensor-parallel shards,
        in the checkpoint's row order)."""
        if self.pipeline is not None:  # rank 0's full model gets every stage's weights
            self.pipeline.sync_weights()
            return None
        if not (self.sharded or self.tensor_parallel > 1):
            return None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=options)
        if self.tensor_parallel > 1:
            weights = reorder_state_dict(
                weights, self.model.config, self.tensor_parallel, to_parallel=False
            )
        return weights

    def save_checkpoint(self) -> Path:
        """Every rank writes its optimizer shard (torch.distributed.checkpoint) and its RNG into
        one temporary directory; rank 0 adds the full weights and renames it into place."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        env, name = self.env, f"step_{self.step:07d}"
        tmp = self.ckpt_dir / f".{name}.partial"
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / TRAIN_STATE_DIR).mkdir(parents=True)
        distributed.barrier(env)
        state = tmp / TRAIN_STATE_DIR
        if self.zero1:
            # ZeRO-1 gathers its shards on rank 0 into one plain optimizer state, which any
            # world size can load (each rank then keeps its own partition).
            self.optimizer.consolidate_state_dict(to=0)
            if env.is_main:
                torch.save(self.optimizer.state_dict(), state / ZERO1_STATE)
        else:
            optimizer_state = get_optimizer_state_dict(
                self._trained, self.optimizer, options=self._optimizer_options()
            )
            with _single_process_dcp():
                dcp.save(
                    {"optimizer": optimizer_state},
                    checkpoint_id=state / "optimizer",
                    no_dist=not env.active,
                )
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, state / f"rng_rank{env.rank}.pt")
        weights = self._full_weights()
        if env.is_main:
            write_model_files(tmp, self.model, tokenizer=self.tokenizer, weights=weights)
            progress = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "elapsed": self.elapsed,
                "data_skips": self.data_skips,
                "optimizer": self.config.optimizer,
                "trainable": self._trainable_names(),
                "world_size": env.world_size,
                "tensor_parallel": self.tensor_parallel,
                "pipeline_stages": self.pipeline_stages,
                "zero1": self.zero1,
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            }
            (state / "progress.json").write_text(json.dumps(progress))
        distributed.barrier(env)  # every rank's files are in tmp before it is committed
        if env.is_main:
            commit_directory(tmp, self.ckpt_dir / name)
            latest_tmp = self.ckpt_dir / "latest.tmp"
            latest_tmp.write_text(name)
            latest_tmp.replace(self.ckpt_dir / "latest")
            kept = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())
            for old in kept[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier(env)
        return self.ckpt_dir / name

    def maybe_resume(self) -> bool:
        """Restore weights, optimizer, RNG and step from the latest checkpoint, if there is one."""
        latest = self.ckpt_dir / "latest"
        if not (self.config.resume and latest.is_file()):
            return False
        self.restore(self.ckpt_dir / latest.read_text().strip())
        if self.env.is_main:
            self._truncate_metrics()
        return True

    def restore(self, path: Path) -> None:
        """Load a checkpoint written by any world size into this run (weights are stored whole,
        the optimizer state is re-sharded by torch.distributed.checkpoint)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if read_model_config(path) != self.model.config:
            raise CheckpointError(
                f"cannot resume from {path}: its model config differs from this run's "
                "(use a new --out directory or --train.resume=false)"
            )
        state = path / TRAIN_STATE_DIR
        if not ((state / "optimizer").is_dir() or (state / ZERO1_STATE).is_file()):
            raise CheckpointError(
                f"cannot resume from {path}: it has no {TRAIN_STATE_DIR}/optimizer (a checkpoint "
                "of an older lmforge, or an incomplete one); use a new --out directory or "
                "--train.resume=false"
            )
        try:
            progress = json.loads((state / "progress.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"cannot resume: {state}/progress.json is unreadable: {e}"
            ) from None
        mine = {"optimizer": self.config.optimizer, "trainable": self._trainable_names()}
        theirs = {k: progress.get(k) for k in mine}
        if theirs != mine:
            what = (
                "optimizer" if theirs["optimizer"] != mine["optimizer"] else "trainable parameters"
            )
            raise CheckpointError(
                f"cannot resume from {path}: its optimizer state does not fit this run's {what} "
                f"({theirs['optimizer']} vs {mine['optimizer']}, {len(theirs['trainable'] or [])} "
                f"vs {len(mine['trainable'])} tensors); use a new --out directory or "
                "--train.resume=false"
            )
        if progress.get("zero1", False) != self.zero1:
            raise CheckpointError(
                f"cannot resume from {path}: its optimizer state was saved with train.zero1="
                f"{progress.get('zero1', False)}, this run has {self.zero1}; resume with the same "
                "setting, or start a new --out from its model (--init_from)"
            )
        saved_pp = progress.get("pipeline_stages", 1)
        if saved_pp != self.pipeline_stages:
            raise CheckpointError(
                f"cannot resume from {path}: its optimizer state is split into {saved_pp} "
                f"pipeline stages, this run has {self.pipeline_stages}; resume with the same "
                "world size, or start a new --out from its model (--init_from)"
            )
        saved_tp = progress.get("tensor_parallel", 1)
        if saved_tp != self.tensor_parallel:
            raise CheckpointError(
                f"cannot resume from {path}: its optimizer state is laid out for tensor parallel "
                f"degree {saved_tp}, this run has {self.tensor_parallel}; resume with the same "
                "degree, or start a new --out from its model (--init_from)"
            )
        weights = load_model(path).state_dict()
        if self.tensor_parallel > 1:
            weights = reorder_state_dict(
                weights, self.model.config, self.tensor_parallel, to_parallel=True
            )
        if self.sharded or self.tensor_parallel > 1:
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, weights, options=options)
        else:
            self.model.load_state_dict(weights)
        if self.zero1:
            self.optimizer.load_state_dict(torch.load(state / ZERO1_STATE, weights_only=True))
        else:
            optimizer_state = get_optimizer_state_dict(
                self._trained, self.optimizer, options=self._optimizer_options()
            )
            try:
                with _single_process_dcp():
                    dcp.load(
                        {"optimizer": optimizer_state},
                        checkpoint_id=state / "optimizer",
                        no_dist=not self.env.active,
                    )
            except Exception as e:  # DCP wraps reader errors in its own exception types
                raise CheckpointError(
                    f"cannot resume: {state}/optimizer is unreadable: {e}"
                ) from None
            set_optimizer_state_dict(
                self._trained, self.optimizer, optimizer_state, options=self._optimizer_options()
            )
        if self.scaler is not None and progress.get("grad_scaler"):
            self.scaler.load_state_dict(progress["grad_scaler"])
        rng_file = state / f"rng_rank{self.env.rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:  # more ranks than the run that saved: a fresh, rank-specific dropout stream
            torch.manual_seed(self.config.seed + 1_000_003 * self.env.rank + progress["step"])
        self.step, self.tokens_seen = progress["step"], progress["tokens_seen"]
        self.elapsed = progress["elapsed"]
        self.data_skips = [tuple(s) for s in progress.get("data_skips", [])]

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint we resume from (they will be redone),
        and lines that do not parse: a crash mid-write leaves its last line cut off. Rewritten
        through a temporary file, so a second crash here cannot lose the kept lines."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step = record.get("step", 0) if isinstance(record, dict) else None
            if isinstance(step, (int, float)) and step <= self.step:
                kept.append(line)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)

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
        compiled graph for evaluation would cost another compilation). Every rank evaluates
        the same windows (FSDP2 needs all ranks in each forward; under pipeline parallel every
        rank runs its full model, given all stages' weights first)."""
        if self.pipeline is not None:
            self.pipeline.sync_weights()
        self.model.eval()
        c = self.config
        losses = [
            self.objective(self.model, _to(b, self.device)).item()
            for b in self.val_data.eval_batches(c.batch_size, c.seq_len, c.eval_batches)
        ]
        if self.sharded:  # FSDP2 keeps the root's weights gathered after a forward without backward
            self.model.reshard()
        self.model.train()
        return sum(losses) / max(1, len(losses))

    def data_step(self, step: int) -> int:
        """The data stream's position for optimizer step `step`: the step plus every batch
        skipped after a loss spike at or before it (so restarts replay exactly)."""
        return step + sum(n for start, n in self.data_skips if start <= step)

    def micro_batches_now(self) -> int:
        """Micro-batches per rank for the next step: the batch-size ramp-up, then the full batch."""
        c = self.config
        if not c.batch_ramp_start:
            return self.micro_batches
        granule = c.batch_size * self.data_ranks
        return ramped_micro_batches(
            self.tokens_seen,
            full=self.micro_batches * granule,
            start=c.batch_ramp_start,
            ramp_tokens=c.batch_ramp_tokens,
            granule=granule,
        )

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over the step's micro-batches on every rank; returns (loss, grad
        norm), both global. A non-finite or spiking step is not applied (last_step_skipped)."""
        c, env = self.config, self.env
        lr = learning_rate(
            c.schedule,
            self.step,
            peak_lr=c.lr,
            warmup_steps=c.warmup_steps,
            total_steps=c.steps,
            min_lr_ratio=c.min_lr_ratio,
            decay_fraction=c.decay_fraction,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n_micro = self.micro_batches_now()
        if self.pipeline is not None:
            return self._pipeline_step(n_micro)
        total, tokens = 0.0, 0
        for micro in range(n_micro):
            # Micro-batch k of rank r is number k * world + r of the step: ranks read disjoint
            # batches, and one process with world x the accumulation reads the same ones.
            batch = self.train_data.get_batch(
                c.batch_size,
                c.seq_len,
                seed=c.seed,
                step=self.data_step(self.step),
                micro_step=micro * self.data_ranks + self.data_rank,
            )
            batch = _to(batch, self.device)
            with distributed.gradient_sync(self.forward_model, micro == n_micro - 1):
                with self._autocast():
                    loss = self._forward_loss(batch)
                    loss = loss + self.z_loss.take()
                scaled = loss / n_micro
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.item()
            tokens += self.tokens_per_batch(batch)
        total, tokens = distributed.all_reduce_sum([total, float(tokens)], env)
        loss = total / (n_micro * env.world_size)  # tensor-parallel ranks hold equal losses
        tokens = tokens / self.tensor_parallel
        params = [p for p in self.model.parameters() if p.grad is not None]
        return self._apply_step(loss, params, norm=None, tokens=tokens)

    def _pipeline_step(self, n_micro: int) -> tuple[float, float]:
        """train_step under pipeline parallel: the step's micro-batches, concatenated, go through
        the 1F1B schedule, which cuts them again into the same micro-batches."""
        c = self.config
        batches = [
            self.train_data.get_batch(
                c.batch_size,
                c.seq_len,
                seed=c.seed,
                step=self.data_step(self.step),
                micro_step=micro,
            )
            for micro in range(n_micro)
        ]
        inputs = torch.cat([b[0] for b in batches]).to(self.device)
        targets = torch.cat([b[1] for b in batches]).to(self.device)
        with self._autocast():
            mean_loss = self.pipeline.step(inputs, targets)
        squares = self.pipeline.local_grad_squares()
        # Only the last stage knows the loss; every stage holds part of the gradient.
        loss, squares = distributed.all_reduce_sum([mean_loss, squares], self.env)
        params = [p for p in self.pipeline.stage.parameters() if p.grad is not None]
        norm = math.sqrt(squares)
        if c.grad_clip and norm > c.grad_clip:  # clip_grad_norm_'s scaling, on the global norm
            for p in params:
                p.grad.mul_(c.grad_clip / (norm + 1e-6))
        tokens = sum(self.tokens_per_batch(b) for b in batches)
        return self._apply_step(loss, params, norm=norm, tokens=tokens)

    def _apply_step(
        self, loss: float, params: list[torch.Tensor], *, norm: float | None, tokens: float
    ) -> tuple[float, float]:
        """Clip (unless done: norm given), check and apply the update; count the step."""
        c = self.config
        if self.scaler is not None:  # clip and check the true gradients, not the scaled ones
            self.scaler.unscale_(self.optimizer)
        if norm is None and self.tensor_parallel > 1:  # sharded and replicated grads side by side
            norm = distributed.clip_mixed_grad_norm(params, c.grad_clip)
        elif norm is None:
            # Clipping at infinity only measures: the global norm (over all shards under FSDP2).
            norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip or math.inf)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.last_step_skipped = self._check_step(loss, norm)
        if self.last_step_skipped is None:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # its own inf check agrees: the norm is finite
            else:
                self.optimizer.step()
            self.spikes.accept(loss)
        if self.scaler is not None:
            # Every step ends the scaler's step: an overflow halves the scale, a run of
            # growth_interval clean steps doubles it.
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += int(tokens)
        return loss, norm

    def _check_pipeline_options(self) -> None:
        """Options the pipeline schedule cannot honour: it runs the stages itself, with one
        micro-batch count, outside the model's forward (hooks) and outside torch.compile."""
        c = self.config
        for name, on in (
            ("train.batch_ramp_start", c.batch_ramp_start),
            ("train.z_loss", c.z_loss),
            ("train.compile", c.compile),
            ("train.precision=fp16", c.precision == "fp16"),
        ):
            if on:
                raise ConfigError(
                    f"train.parallel=pp does not support {name}; turn it off or use ddp/fsdp"
                )

    def _check_step(self, loss: float, norm: float) -> str | None:
        """Why this step's update must not be applied ("overflow", "nonfinite", "spike"), or None.

        Under fp16 loss scaling, a finite loss with a non-finite gradient is the scaler's
        overflow (the scale was too high): the scaler skips it and lowers the scale, which is
        its normal way of finding the scale, not a failure of the run. Once the scale is down
        to 1 the gradient overflows unscaled: that is a non-finite step like any other."""
        c = self.config
        if (
            self.scaler is not None
            and math.isfinite(loss)
            and not math.isfinite(norm)
            and self.scaler.get_scale() > 1.0
        ):
            self.overflow_steps += 1
            return "overflow"
        if not (math.isfinite(loss) and math.isfinite(norm)):
            if self.step == 0 and not self.data_skips:
                raise TrainingDivergedError(
                    f"the loss ({loss}) or gradient norm ({norm}) of the very first step is not "
                    "finite: the model, its initialisation or the data is broken, not the "
                    "optimisation (check model.init_std, precision and the token ids)"
                )
            self.nonfinite_steps += 1
            if self.nonfinite_steps > c.max_nonfinite_steps:
                raise TrainingDivergedError(
                    f"{self.nonfinite_steps} steps had a non-finite loss or gradient (the last at "
                    f"step {self.step + 1}: loss {loss}, grad norm {norm}); more than "
                    f"train.max_nonfinite_steps={c.max_nonfinite_steps}: lower train.lr, raise "
                    "train.warmup_steps or use fp32"
                )
            return "nonfinite"
        if self.spikes.is_spike(loss):
            return "spike"
        return None

    def _roll_back(self, spike_step: int, loss: float) -> dict:
        """PaLM's remedy for a loss spike: reload the newest checkpoint at least
        spike_rollback_steps before it, then skip spike_skip_batches batches of data."""
        c = self.config
        self.spike_restarts += 1
        if self.spike_restarts > c.max_spike_restarts:
            raise TrainingDivergedError(
                f"loss spike at step {spike_step} (loss {loss:.4g}, median "
                f"{self.spikes.median():.4g}) after {c.max_spike_restarts} rollbacks "
                "(train.max_spike_restarts): the run is unstable; lower train.lr"
            )
        median = self.spikes.median()
        saved = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())
        target_step = spike_step - 1 - c.spike_rollback_steps
        older = [p for p in saved if int(p.name.split("_")[1]) <= target_step]
        event = {
            "event": "loss_spike",
            "spike_step": spike_step,
            "loss": loss,
            "median": median,
            "skipped_batches": c.spike_skip_batches,
        }
        if older or saved:
            self.restore(older[-1] if older else saved[0])
        event["step"] = event["rolled_back_to"] = self.step
        self.data_skips.append((self.step, c.spike_skip_batches))
        self.spikes.reset()
        if self.env.is_main:
            self._truncate_metrics()
        return event

    def _log(self, record: dict) -> None:
        if not self.env.is_main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.sinks is not None:
            self.sinks.log(record)

    def fit(self) -> dict:
        """Train to `config.steps`; returns a summary of the run."""
        with distributed.name_failing_rank(self.env, self.config.dist_timeout_s):
            return self._fit()

    def _fit(self) -> dict:
        c, env = self.config, self.env
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier(env)
        resumed_from = self.step if self.maybe_resume() else None
        if env.is_main and (c.log_tensorboard or c.log_wandb):
            self.sinks = loggers.MetricSinks(
                self.out_dir, tensorboard=c.log_tensorboard, wandb=c.log_wandb,
                config=dataclasses.asdict(c),
            )  # fmt: skip
        if self.step == 0:
            # Dropout stream (init was seeded by the caller); rank 0 keeps the single-process one.
            torch.manual_seed(c.seed + 1_000_003 * env.rank)
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
            disable=None if env.is_main else True,
        )
        window_start, window_tokens = time.perf_counter(), 0
        while self.step < c.steps:
            t0, tokens_before = time.perf_counter(), self.tokens_seen
            loss, norm = self.train_step()
            dt = time.perf_counter() - t0
            self.elapsed += dt
            if self.last_step_skipped == "spike":
                self._log(self._roll_back(self.step, loss))
                bar.n = self.step
                continue
            window_tokens += self.tokens_seen - tokens_before
            tok_s = (self.tokens_seen - tokens_before) / dt
            # Peak FLOP/s is per device; tokens/s is over all ranks.
            mfu = flops_per_token * tok_s / (self.peak_flops * env.world_size)
            record = {
                "step": self.step,
                "loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": norm,
                "tokens": self.tokens_seen,
                "tok_per_s": tok_s,
                "mfu": mfu,
                "mem_peak_mb": peak_memory_bytes(self.device) / 2**20,
                "elapsed": self.elapsed,
            }
            if self.last_step_skipped == "nonfinite":
                record["skipped"] = "nonfinite"
                record["nonfinite_steps"] = self.nonfinite_steps
            if self.scaler is not None:
                record["loss_scale"] = self.scaler.get_scale()
                if self.last_step_skipped == "overflow":
                    record["skipped"] = "overflow"
                    record["overflow_steps"] = self.overflow_steps
            out_of_time = 0 < c.time_limit_s <= self.elapsed
            if c.time_limit_s and env.active:  # clocks differ by rank: stop when any is out
                out_of_time = distributed.all_reduce_sum([float(out_of_time)], env)[0] > 0
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
                if bar.disable and env.is_main:  # no terminal (CI, nohup): a plain log line
                    val = f" val_loss {val_loss:.3f}" if "val_loss" in record else ""
                    print(
                        f"step {self.step}/{c.steps} loss {loss:.3f}{val} "
                        f"{window_rate:,.0f} tok/s mfu {100 * mfu:.0f}%",
                        file=sys.stderr,
                        flush=True,
                    )
                window_start, window_tokens = time.perf_counter(), 0
            if last or (c.save_every and self.step % c.save_every == 0):
                self.save_checkpoint()
            if out_of_time:
                if env.is_main:
                    print(
                        f"time limit of {c.time_limit_s:g}s reached at step {self.step}",
                        file=sys.stderr,
                    )
                break
        bar.close()
        if self.sinks is not None:
            self.sinks.close()
            self.sinks = None
        if val_loss is None and self.val_data is not None:  # resumed a finished run
            val_loss = self.evaluate()
        weights = self._full_weights()
        if env.is_main:
            save_model(
                self.model, self.out_dir / "model", tokenizer=self.tokenizer, weights=weights
            )
        distributed.barrier(env)
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
            "mfu": flops_per_token
            * self.tokens_seen
            / max(self.elapsed, 1e-9)
            / (self.peak_flops * env.world_size),
            "world_size": env.world_size,
            "nonfinite_steps": self.nonfinite_steps,
            "overflow_steps": self.overflow_steps,
            "spike_restarts": self.spike_restarts,
        }
