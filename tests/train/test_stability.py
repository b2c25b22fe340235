import json

import pytest
import torch
from test_trainer import PatternData, config, small_model

from lmforge.train.objectives import causal_lm_loss
from lmforge.train.recompute import apply_recomputation
from lmforge.train.stability import TrainingDivergedError
from lmforge.train.trainer import Trainer

CORRUPT_STEP = 10


class CorruptedData(PatternData):
    """The learnable stream, except that data step CORRUPT_STEP is random tokens."""

    def get_batch(self, batch_size, seq_len, *, seed, step, micro_step=0):
        if step == CORRUPT_STEP:
            g = torch.Generator().manual_seed(7)
            x = torch.randint(0, self.vocab, (batch_size, seq_len + 1), generator=g)
            return x[:, :-1], x[:, 1:]
        return super().get_batch(batch_size, seq_len, seed=seed, step=step, micro_step=micro_step)


class ShiftedData(PatternData):
    """Reference stream: clean data that jumps `skip` batches ahead from step `start` on."""

    def __init__(self, start, skip):
        super().__init__()
        self.start, self.skip = start, skip

    def get_batch(self, batch_size, seq_len, *, seed, step, micro_step=0):
        step = step + self.skip if step >= self.start else step
        return super().get_batch(batch_size, seq_len, seed=seed, step=step, micro_step=micro_step)


def records(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def spike_config(**kw):
    base = dict(
        steps=16,
        lr=3e-2,
        warmup_steps=1,
        eval_every=0,
        save_every=2,
        keep_checkpoints=4,
        spike_factor=1.5,
        spike_window=8,
        spike_rollback_steps=2,
        spike_skip_batches=3,
    )
    return config(**{**base, **kw})


def test_loss_spike_rolls_back_skips_batches_and_ends_like_a_clean_run(tmp_path):
    spiky = Trainer(small_model(dropout=0.0), spike_config(), CorruptedData(), tmp_path / "a")
    summary = spiky.fit()
    assert summary["spike_restarts"] == 1
    events = [r for r in records(tmp_path / "a") if r.get("event") == "loss_spike"]
    # The spike is seen in step 11 (data step 10) and never applied; the newest checkpoint at
    # least 2 steps before it is step 8; from there the data stream skips 3 batches.
    assert len(events) == 1
    assert events[0]["spike_step"] == CORRUPT_STEP + 1 and events[0]["rolled_back_to"] == 8
    assert events[0]["loss"] > 1.5 * events[0]["median"]
    assert spiky.data_skips == [(8, 3)]

    clean = Trainer(
        small_model(dropout=0.0), spike_config(), ShiftedData(8, 3), tmp_path / "b"
    ).fit()
    assert clean["spike_restarts"] == 0
    steps_a = [
        (r["step"], r["loss"]) for r in records(tmp_path / "a") if "loss" in r and "event" not in r
    ]
    steps_b = [(r["step"], r["loss"]) for r in records(tmp_path / "b")]
    assert steps_a == steps_b  # bitwise: the rollback left no trace in weights or optimizer
    assert summary["final_val_loss"] == clean["final_val_loss"]


def nan_on_marked_batches(model, batch):
    loss = causal_lm_loss(model, batch)
    return loss * float("nan") if bool((batch[0] == 0).all()) else loss


class MarkedData(PatternData):
    def __init__(self, marked):
        super().__init__()
        self.marked = marked

    def get_batch(self, batch_size, seq_len, *, seed, step, micro_step=0):
        if step in self.marked:
            zeros = torch.zeros(batch_size, seq_len, dtype=torch.long)
            return zeros, zeros
        return super().get_batch(batch_size, seq_len, seed=seed, step=step, micro_step=micro_step)


def test_nonfinite_steps_are_skipped_counted_and_bounded(tmp_path):
    trainer = Trainer(
        small_model(dropout=0.0),
        config(steps=6, eval_every=0),
        MarkedData({2, 4}),
        tmp_path / "a",
        objective=nan_on_marked_batches,
    )
    trainer.train_step()
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step()  # data step 2: NaN loss, no update
    assert trainer.last_step_skipped == "nonfinite" and trainer.nonfinite_steps == 1
    for p, q in zip(before, trainer.model.parameters()):
        assert torch.equal(p, q)
    assert all(p.grad is None for p in trainer.model.parameters())
    summary = trainer.fit()
    assert summary["nonfinite_steps"] == 2
    skipped = [r["step"] for r in records(tmp_path / "a") if r.get("skipped") == "nonfinite"]
    assert skipped == [5]  # steps 1-3 ran before fit; the one at data step 4 is logged

    with pytest.raises(
        TrainingDivergedError, match="2 steps had a non-finite.*max_nonfinite_steps=1"
    ):
        Trainer(
            small_model(),
            config(steps=6, max_nonfinite_steps=1),
            MarkedData({2, 4}),
            tmp_path / "b",
            objective=nan_on_marked_batches,
        ).fit()


def test_nan_in_the_first_step_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingDivergedError, match="very first step is not finite"):
        Trainer(
            small_model(),
            config(steps=3),
            MarkedData({0}),
            tmp_path,
            objective=nan_on_marked_batches,
        ).fit()


def test_z_loss_adds_the_squared_log_normalizer(tmp_path):
    model = small_model(dropout=0.0)
    x, y = PatternData().get_batch(4, 16, seed=0, step=0)
    with torch.no_grad():
        logits = model(x)
        ce = torch.nn.functional.cross_entropy(logits.view(-1, 50), y.reshape(-1))
        z = 1e-4 * torch.logsumexp(logits, -1).pow(2).mean()
    trainer = Trainer(model, config(z_loss=1e-4), PatternData(), tmp_path)
    loss, _ = trainer.train_step()
    assert loss == pytest.approx((ce + z).item(), rel=1e-6)
    assert z.item() > 1e-4  # the term is not negligible at this scale: the check can fail


def saved_activation_bytes(model, x):
    """Bytes autograd keeps for backward (the activation memory recomputation saves)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).float().logsumexp(-1).mean()
    return loss, total


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputation_gives_identical_gradients_with_less_saved_memory(mode):
    x = torch.randint(0, 50, (4, 32))
    plain = small_model(dropout=0.0)
    recomputed = small_model(dropout=0.0)
    chosen = apply_recomputation(recomputed, mode, every=2)
    assert chosen == ([0, 1] if mode == "full" else [0])
    loss_a, bytes_a = saved_activation_bytes(plain, x)
    loss_b, bytes_b = saved_activation_bytes(recomputed, x)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert bytes_b < 0.8 * bytes_a
    assert recomputed.state_dict().keys() == plain.state_dict().keys()


def test_batch_ramp_up_grows_the_tokens_per_step(tmp_path):
    Trainer(
        small_model(),
        config(
            steps=6, batch_size=2, grad_accum=4, batch_ramp_start=2, batch_ramp_tokens=100,
            eval_every=0,
        ),
        PatternData(),
        tmp_path,
    ).fit()  # fmt: skip
    tokens = [r["tokens"] for r in records(tmp_path)]
    per_step = [b - a for a, b in zip([0] + tokens, tokens)]
    # Global batch int(2 + 6 * seen / 100) sequences of 16 tokens, rounded down to micro-batches
    # of 2: seen 0 -> 2, 32 -> 3.92, 64 -> 5.84, then past the ramp the full 8.
    assert per_step == [32, 32, 64, 128, 128, 128]


class RecordingData(PatternData):
    def __init__(self):
        super().__init__()
        self.steps = []

    def get_batch(self, batch_size, seq_len, *, seed, step, micro_step=0):
        self.steps.append(step)
        return super().get_batch(batch_size, seq_len, seed=seed, step=step, micro_step=micro_step)


def test_skipped_batches_survive_a_restart(tmp_path):
    """The data position after a rollback is part of the checkpoint: a restarted run continues
    the skipped stream instead of replaying the skipped batches."""
    data = RecordingData()
    first = Trainer(small_model(), config(steps=4, save_every=2, eval_every=0), data, tmp_path)
    first.data_skips = [(1, 5)]  # as if a spike at step 1 had skipped 5 batches
    first.fit()
    assert data.steps == [0, 6, 7, 8]
    data = RecordingData()
    again = Trainer(small_model(), config(steps=6, save_every=2, eval_every=0), data, tmp_path)
    assert again.fit()["resumed_from"] == 4
    assert again.data_skips == [(1, 5)] and data.steps == [9, 10]
