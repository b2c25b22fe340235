"""Distillation: the loss against its formula written out, the T^2 scaling's purpose (Hinton et
al. 2015), and a few Trainer steps of a tiny student against a tiny teacher."""

import json
import math

import pytest
import torch

from lmforge.compress.distill import (
    DistillationObjective,
    DistillConfig,
    distill,
    distillation_loss,
)
from lmforge.data.shards import write_shards
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_bpe
from lmforge.train.checkpoint import save_model
from lmforge.train.objectives import IGNORE_INDEX
from lmforge.train.trainer import TrainConfig, Trainer


def test_loss_equals_the_formula_written_out():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    targets = torch.tensor([[1, 4, IGNORE_INDEX], [0, IGNORE_INDEX, 2]])
    T, alpha = 3.0, 0.7
    soft = hard = 0.0
    positions = [(b, t) for b in range(2) for t in range(3) if targets[b, t] != IGNORE_INDEX]
    for b, t in positions:
        zs, zt = student[b, t].tolist(), teacher[b, t].tolist()
        ps = [math.exp(z / T) / sum(math.exp(v / T) for v in zs) for z in zs]
        pt = [math.exp(z / T) / sum(math.exp(v / T) for v in zt) for z in zt]
        soft += sum(q * math.log(q / p) for p, q in zip(ps, pt))
        hard -= math.log(math.exp(zs[targets[b, t]]) / sum(math.exp(v) for v in zs))
    expected = (alpha * T**2 * soft + (1 - alpha) * hard) / len(positions)
    got = distillation_loss(student, teacher, targets, temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_t_squared_keeps_soft_gradients_independent_of_temperature():
    # Hinton et al. 2015, sec. 2.1: for large T the soft term's gradient w.r.t. the student's
    # zero-mean logits z is (z - v) / (N V) times T^2 / T^2, i.e. independent of T.
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 10, generator=g)
    z = torch.randn(4, 10, generator=g)
    z, v = z - z.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    targets = torch.zeros(4, dtype=torch.long)
    limit = (z - v) / (4 * 10)
    for T, tolerance in ((100.0, 0.02), (1000.0, 0.002)):  # the approximation is O(1/T)
        s = z.clone().requires_grad_(True)
        distillation_loss(s, v, targets, temperature=T, alpha=1.0).backward()
        assert ((s.grad - limit).norm() / limit.norm()).item() < tolerance


def test_same_distribution_costs_only_the_label_term():
    logits = torch.randn(2, 4, 7)
    targets = torch.randint(0, 7, (2, 4))
    only_soft = distillation_loss(logits, logits.clone(), targets, alpha=1.0)
    assert only_soft.abs().item() < 1e-6


def test_bad_inputs():
    a, y = torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ConfigError, match="same vocabulary"):
        distillation_loss(a, torch.randn(1, 2, 6), y)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        distillation_loss(a, a, y, temperature=0)
    with pytest.raises(ConfigError, match="alpha"):
        DistillationObjective(torch.nn.Linear(1, 1), alpha=1.5)


class Repeating:
    """A BatchSource of windows from one fixed token stream."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def get_batch(self, batch_size, seq_len, *, seed, step, micro_step=0):
        g = torch.Generator().manual_seed(seed * 100_003 + step * 101 + micro_step)
        starts = torch.randint(0, len(self.tokens) - seq_len - 1, (batch_size,), generator=g)
        rows = torch.stack([self.tokens[s : s + seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    def eval_batches(self, batch_size, seq_len, max_batches):
        yield self.get_batch(batch_size, seq_len, seed=9, step=0)


def tiny(d_model: int, n_layers: int, seed: int) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=64, d_model=d_model, n_layers=n_layers, n_heads=2, max_seq_len=32, init_std=0.3
    )
    return Transformer(config)


def kl_to_teacher(student, teacher, x) -> float:
    with torch.no_grad():
        t = torch.log_softmax(teacher(x), -1)
        s = torch.log_softmax(student(x), -1)
        return (t.exp() * (t - s)).sum(-1).mean().item()


def test_student_learns_from_the_teacher_with_the_trainer(tmp_path):
    teacher = tiny(32, 2, seed=0).eval()
    student = tiny(16, 1, seed=1)
    data = Repeating(torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(2)))
    held_out = data.get_batch(8, 16, seed=5, step=0)[0]
    before = kl_to_teacher(student, teacher, held_out)
    config = TrainConfig(
        steps=30,
        batch_size=8,
        seq_len=16,
        lr=1e-2,
        warmup_steps=0,
        eval_every=0,
        save_every=0,
        device="cpu",
        log_every=10,
        schedule="constant",
        weight_decay=0.0,
    )
    objective = DistillationObjective(teacher, temperature=2.0, alpha=0.9)
    Trainer(student, config, data, tmp_path, objective=objective).fit()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").open()]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert kl_to_teacher(student.eval(), teacher, held_out) < 0.75 * before


def test_distill_command(tmp_path):
    texts = [f"the number {i} follows {i - 1} and precedes {i + 1}." for i in range(200)]
    tokenizer = train_bpe(texts, 300, min_frequency=1)
    write_shards(texts, tokenizer, tmp_path / "shards", val_fraction=0.1)
    tokenizer.save(tmp_path / "shards")
    torch.manual_seed(0)
    teacher_config = ModelConfig(vocab_size=320, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    save_model(Transformer(teacher_config), tmp_path / "teacher", tokenizer=tokenizer)
    summary = distill(
        DistillConfig(
            teacher=str(tmp_path / "teacher"),
            student=ModelConfig(d_model=16, n_layers=1, n_heads=2),
            data=str(tmp_path / "shards"),
            train=TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=0, device="cpu"),
            out=str(tmp_path / "run"),
        )
    )
    assert summary is not None
    student_dir = tmp_path / "run" / "model"
    assert (student_dir / "config.yaml").is_file() and (student_dir / "tokenizer.json").is_file()
    with pytest.raises(ConfigError, match="--teacher"):
        distill(DistillConfig(data=str(tmp_path / "shards")))
