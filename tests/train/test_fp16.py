"""fp16 autocast with dynamic loss scaling (torch.amp.GradScaler) on CPU, on a tiny model."""

import json

import pytest
import torch
from test_trainer import PatternData, config, small_model

from lmforge.errors import ConfigError
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.stability import TrainingDivergedError
from lmforge.train.trainer import Trainer


def records(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fp16_trainer(out, **kw):
    base = dict(steps=8, eval_every=0, save_every=0, precision="fp16", warmup_steps=1)
    return Trainer(small_model(dropout=0.0), config(**{**base, **kw}), PatternData(), out)


def test_overflow_is_skipped_by_the_scaler_not_counted_as_nonfinite(tmp_path):
    trainer = fp16_trainer(tmp_path / "a")
    # At a scale of 2^24 the gradient of the fp16 logits, up to scale / 64 (mean over 4 x 16
    # targets), exceeds fp16's maximum 65504: inf, the scaler's overflow, which a run meets
    # while it searches its scale.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss, norm = trainer.train_step()  # step 0: not "the first step diverged"
    assert trainer.last_step_skipped == "overflow" and not torch.isfinite(torch.tensor(norm))
    assert torch.isfinite(torch.tensor(loss))
    assert trainer.overflow_steps == 1 and trainer.nonfinite_steps == 0
    for p, q in zip(before, trainer.model.parameters()):
        assert torch.equal(p, q)  # no update
    assert trainer.scaler.get_scale() == 2.0**23  # backoff factor 0.5
    summary = trainer.fit()
    assert summary["nonfinite_steps"] == 0 and summary["overflow_steps"] >= 1
    logged = records(tmp_path / "a")
    assert all("loss_scale" in r for r in logged)
    # Each overflow halves the scale; once it fits, steps are applied and the loss falls.
    applied = [r for r in logged if "skipped" not in r]
    assert applied and all(r["loss_scale"] <= 2.0**21 for r in applied)
    assert applied[-1]["loss"] < applied[0]["loss"]
    assert not any(p.equal(q) for p, q in zip(before, trainer.model.parameters()) if p.ndim > 1)


def test_scaled_gradients_are_unscaled_before_clipping(tmp_path):
    # With the default scale (2^16) the tiny model does not overflow: the measured gradient
    # norm is the true one (fp32's, up to fp16 rounding), not 65536 times it.
    fp16 = fp16_trainer(tmp_path / "a", grad_clip=0.0)
    fp32 = fp16_trainer(tmp_path / "b", grad_clip=0.0, precision="fp32")
    loss16, norm16 = fp16.train_step()
    loss32, norm32 = fp32.train_step()
    assert fp16.last_step_skipped is None and fp16.scaler.get_scale() == 2.0**16
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert norm16 == pytest.approx(norm32, rel=2e-2)


def test_fp16_refuses_sharded_gradients(monkeypatch):
    from lmforge.train import distributed

    # Rank 0 of 2 (no process group is needed: the check fires before any collective).
    monkeypatch.setattr(distributed, "current", lambda: distributed.DistEnv(0, 2, 0))
    with pytest.raises(ConfigError, match="fp16 scales gradients that FSDP2"):
        Trainer(small_model(), config(precision="fp16", parallel="fsdp"), PatternData(), "x")


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not finite at any scale."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def nan_gradient_loss(model, batch):
    return causal_lm_loss(model, batch) + 0.0 * NaNGradient.apply(model.norm.weight).sum()


def test_overflow_at_scale_one_is_a_nonfinite_step(tmp_path):
    trainer = Trainer(
        small_model(dropout=0.0),
        config(steps=4, eval_every=0, save_every=0, precision="fp16"),
        PatternData(),
        tmp_path,
        objective=nan_gradient_loss,
    )
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    trainer.train_step()
    trainer.train_step()  # scales 4 and 2: the scaler's overflows
    assert trainer.overflow_steps == 2 and trainer.scaler.get_scale() == 1.0
    trainer.train_step()  # at scale 1 the gradient itself is not finite
    assert trainer.last_step_skipped == "nonfinite" and trainer.nonfinite_steps == 1
    assert trainer.overflow_steps == 2
    first = Trainer(
        small_model(dropout=0.0),
        config(steps=4, eval_every=0, save_every=0, precision="fp16"),
        PatternData(),
        tmp_path / "b",
        objective=nan_gradient_loss,
    )
    first.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    with pytest.raises(TrainingDivergedError, match="very first step is not finite"):
        first.train_step()
