"""Knowledge distillation (Hinton et al. 2015; seed 001, 模型压缩技术): a student learns from a
teacher's softened distribution and from the data's own next tokens.

loss = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE.
Dividing the logits by a temperature T > 1 exposes the teacher's "dark knowledge" (the relative
probabilities of wrong tokens); the gradients of the soft term scale as 1/T^2, so it is multiplied
by T^2 to keep its weight against the hard-label term when T changes (Hinton et al. 2015, sec. 2).
The student trains with lmforge's Trainer; only the objective differs from pre-training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import field_, save_yaml
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig
from lmforge.train.objectives import IGNORE_INDEX
from lmforge.train.trainer import TrainConfig, Trainer


def _check(temperature: float, alpha: float) -> None:
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha (weight of the soft-label term) must be in [0, 1], got {alpha}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on `targets`, both
    averaged over the positions whose target is not IGNORE_INDEX."""
    _check(temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: teacher and student need the same vocabulary"
        )
    keep = targets != IGNORE_INDEX
    student, teacher = student_logits[keep].float(), teacher_logits[keep].float()
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",  # sum over the vocabulary, mean over positions: the true KL
    )
    hard = F.cross_entropy(student, targets[keep])
    return alpha * temperature**2 * soft + (1 - alpha) * hard


class DistillationObjective:
    """A Trainer objective `(student, (x, y)) -> loss` with a frozen teacher in eval mode."""

    def __init__(self, teacher: nn.Module, *, temperature: float = 2.0, alpha: float = 0.5):
        _check(temperature, alpha)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def __call__(
        self, student: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        x, y = batch
        device = next(self.teacher.parameters()).device
        with torch.no_grad():
            teacher_logits = self.teacher(x.to(device)).to(x.device)
        return distillation_loss(
            student(x), teacher_logits, y, temperature=self.temperature, alpha=self.alpha
        )


@dataclass
class DistillConfig:
    """Distil a teacher model into a smaller student on token shards."""

    teacher: str = field_("", "teacher: checkpoint, run, Hugging Face directory or GGUF file")
    student: ModelConfig = field_(
        ModelConfig(d_model=128, n_layers=2, n_heads=2),
        "student architecture (vocab_size and max_seq_len follow the teacher)",
    )
    init_from: str = field_("", "start the student from this checkpoint instead of a random init")
    data: str = field_("", "token shard directory written with the teacher's tokenizer")
    temperature: float = field_(2.0, "softmax temperature T of the soft targets", gt=0)
    alpha: float = field_(
        0.5, "weight of the soft (teacher) term; 1 - alpha on the labels", ge=0, le=1
    )
    train: TrainConfig = field_(TrainConfig(steps=200, warmup_steps=20), "optimisation")
    out: str = field_("runs/distill", "run directory (metrics, checkpoints, final student)")


def distill(config: DistillConfig) -> dict[str, Any]:
    """Train the student against the teacher; returns the Trainer's summary."""
    from dataclasses import replace

    from lmforge.data.shards import TokenShards
    from lmforge.loading import load
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.pretrain import check_fit
    from lmforge.train.trainer import resolve_device

    if not config.teacher or not config.data:
        raise ConfigError("give --teacher=MODEL and --data=SHARD_DIR")
    teacher = load(config.teacher, device=resolve_device(config.train.device))
    train_data = TokenShards(config.data, "train")
    torch.manual_seed(config.train.seed)
    if config.init_from:
        student = load(config.init_from).train()
    else:
        tc = teacher.config
        config.student = replace(
            config.student, vocab_size=tc.vocab_size, max_seq_len=tc.max_seq_len
        )
        student = Transformer(config.student)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ConfigError(
            f"student vocab_size {student.config.vocab_size} differs from the teacher's "
            f"{teacher.config.vocab_size}: distillation matches distributions token by token"
        )
    check_fit(student.config, config.train, train_data.vocab_size, config.data)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(config, out / "run.yaml")
    trainer = Trainer(
        student,
        config.train,
        train_data,
        out,
        val_data=TokenShards(config.data, "validation"),
        objective=DistillationObjective(
            teacher, temperature=config.temperature, alpha=config.alpha
        ),
        tokenizer=Tokenizer.load(config.data)
        if (Path(config.data) / "tokenizer.json").is_file()
        else None,
    )
    return trainer.fit()
