"""Pipeline parallelism (GPipe, Huang et al. 2019; 1F1B from PipeDream, Narayanan et al. 2019) of
a finished lmforge Transformer through `torch.distributed.pipelining`.

Every rank is one stage: stage 0 runs the token (and learned position) embedding and the first
n_layers/stages blocks, the last stage the last blocks, the final norm and the output layer. The
step's batch is cut into micro-batches that flow through the stages in the 1F1B order (after a
warm-up, each stage alternates one forward and one backward), so a stage holds the activations of
at most `stages` micro-batches instead of all of them.

Every rank keeps the whole model object (built from the same seed) but trains only its stage's
parameters; `sync_weights` broadcasts each stage's weights from its owner before the full model
is evaluated or saved. A tied output layer (tie_embeddings) lives on the first and the last stage:
each computes a partial gradient of the one matrix, the two are summed between those two ranks
(Megatron-LM's embedding group, Shoeybi et al. 2019) and both apply the same update, so the two
copies never drift apart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.attention import build_mask
from lmforge.model.config import PLAIN
from lmforge.train.objectives import IGNORE_INDEX


def check_split(n_layers: int, stages: int, micro_batches: int) -> None:
    """The layer count must split evenly into stages, and 1F1B needs a micro-batch per stage."""
    if n_layers % stages:
        raise ConfigError(
            f"pipeline parallel: model.n_layers={n_layers} cannot be split evenly into {stages} "
            f"stages (one per process); use a world size that divides the layer count"
        )
    if micro_batches < stages:
        raise ConfigError(
            f"pipeline parallel: {micro_batches} micro-batches per step is fewer than the "
            f"{stages} stages, so the 1F1B schedule would leave stages idle; raise "
            "train.global_batch_size (or train.grad_accum) or lower train.batch_size"
        )


class Stage(nn.Module):
    """One pipeline stage of `model`; its parameter names are the model's own (blocks keep their
    index), so optimizer states and checkpoints use the same keys as without the pipeline."""

    def __init__(self, model: nn.Module, index: int, stages: int) -> None:
        super().__init__()
        # A stage replays the plain causal decoder's forward (embedding, causal mask, RoPE or
        # learned positions, pre-norm blocks): other architectures would be silently wrong.
        c = model.config
        other = [f"{k}={getattr(c, k)!r}" for k, plain in PLAIN.items() if getattr(c, k) != plain]
        if c.position not in ("rope", "learned"):
            other.append(f"position={c.position!r}")
        if other:
            raise ConfigError(
                "pipeline parallelism runs the plain causal decoder (RoPE or learned positions); "
                f"this model has {', '.join(other)}"
            )
        per_stage = model.config.n_layers // stages
        first = index * per_stage
        self.is_first, self.is_last = index == 0, index == stages - 1
        self.rope = model.rope  # buffers only: every stage needs the rotations
        if self.is_first:
            self.embed = model.embed
            self.pos_embed = getattr(model, "pos_embed", None)
            self.drop = model.drop
        self.blocks = nn.ModuleDict(
            {str(i): model.blocks[i] for i in range(first, first + per_stage)}
        )
        if self.is_last:
            self.norm, self.lm_head = model.norm, model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states (others) -> hidden states, or logits (last)."""
        T = x.shape[1]
        positions = torch.arange(T, device=x.device)[None]
        if self.is_first:
            x = self.embed(x)
            if self.pos_embed is not None:
                x = x + self.pos_embed(positions)
            x = self.drop(x)
        rope = self.rope(positions) if self.rope is not None else None
        mask = build_mask(T, 0, None, x.device)
        for block in self.blocks.values():
            x = block(x, rope, mask)
        if self.is_last:
            x = self.lm_head(self.norm(x))
        return x


def owner_stages(model: nn.Module, stages: int) -> dict[str, int]:
    """The stage that trains each parameter (by the model's deduplicated names; a tied output
    layer is listed once, under embed.weight, as stage 0's)."""
    per_stage = model.config.n_layers // stages
    owners = {}
    for name, _ in model.named_parameters():
        if name.startswith("blocks."):
            owners[name] = int(name.split(".")[1]) // per_stage
        elif name.startswith(("embed.", "pos_embed.")):
            owners[name] = 0
        else:  # final norm, untied output layer
            owners[name] = stages - 1
    return owners


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The last stage's loss per micro-batch: causal_lm_loss on the logits (mean over targets)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


class Pipeline:
    """Runs the 1F1B schedule of this rank's stage over a step's batch."""

    def __init__(self, model: nn.Module, device: torch.device, micro_batches: int) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        self.model = model
        self.rank, self.stages = dist.get_rank(), dist.get_world_size()
        check_split(model.config.n_layers, self.stages, micro_batches)
        self.stage = Stage(model, self.rank, self.stages)
        pipe_stage = PipelineStage(self.stage, self.rank, self.stages, device)
        # scale_grads: the gradients are the mean over micro-batches, like one process's
        # accumulation of loss / n_micro.
        self.schedule = Schedule1F1B(pipe_stage, micro_batches, loss_fn=lm_loss, scale_grads=True)
        self.owners = owner_stages(model, self.stages)
        self.tied = model.lm_head.weight is model.embed.weight
        # All ranks must create every group, in the same order, even those not in it.
        ends = sorted({0, self.stages - 1})
        self.tied_group = dist.new_group(ends) if self.tied else None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward and backward of the whole batch (the schedule cuts it into micro-batches);
        returns the mean loss on the last stage and 0.0 elsewhere. Gradients end up in the
        stage's parameters, the tied matrix's already summed over its two stages."""
        losses: list[torch.Tensor] = []
        is_last = self.rank == self.stages - 1
        if self.rank == 0:  # only the first stage takes inputs, only the last targets
            self.schedule.step(inputs, return_outputs=False)
        else:
            target = targets if is_last else None
            self.schedule.step(target=target, losses=losses, return_outputs=False)
        if self.tied and self.rank in (0, self.stages - 1):
            weight = self.model.embed.weight
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            dist.all_reduce(weight.grad, group=self.tied_group)
        if not is_last:
            return 0.0
        return float(torch.stack([x.detach().float() for x in losses]).mean())

    def local_grad_squares(self) -> float:
        """Sum of squared gradients of the parameters this rank owns (the tied matrix counted
        once, on stage 0), for the global norm."""
        total = 0.0
        for name, p in self.model.named_parameters():
            if self.owners[name] == self.rank and p.grad is not None:
                total += float(p.grad.float().pow(2).sum())
        return total

    def sync_weights(self) -> None:
        """Give every rank's full model the current weights of every stage (before evaluating
        or saving it): each parameter is broadcast from the stage that trains it."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                dist.broadcast(p.data, src=self.owners[name])
