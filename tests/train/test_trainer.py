import json
import math

import pytest
import torch

import lmforge
from lmforge.errors import CheckpointError
from lmforge.model import ModelConfig, Transformer
from lmforge.train.checkpoint import save_model
from lmforge.train.optim import cosine_schedule, param_groups
from lmforge.train.trainer import TrainConfig, Trainer


class PatternData:
    """A learnable stream: a repeating pattern with noise, batches a pure function of step."""

    def __init__(self, vocab: int = 50) -> None:
        self.vocab = vocab

    def _windows(self, g, batch_size, seq_len):
        start = torch.randint(0, self.vocab, (batch_size, 1), generator=g)
        seq = (start + torch.arange(seq_len + 1)) % self.vocab
        return seq[:, :-1], seq[:, 1:]

    def get_batch(self, batch_size, seq_len, *, seed, step, micro_step=0):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + micro_step)
        return self._windows(g, batch_size, seq_len)

    def eval_batches(self, batch_size, seq_len, max_batches):
        g = torch.Generator().manual_seed(12345)
        for _ in range(max_batches or 2):
            yield self._windows(g, batch_size, seq_len)


def small_model(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return Transformer(
        ModelConfig(
            vocab_size=50,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            max_seq_len=32,
            dropout=dropout,
        )
    )


def config(**kw):
    base = dict(
        steps=8,
        batch_size=4,
        seq_len=16,
        lr=1e-2,
        warmup_steps=2,
        eval_every=4,
        eval_batches=2,
        save_every=4,
        log_every=1,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, lines)]


def test_exact_resume_equals_uninterrupted_run(tmp_path):
    """2N steps straight == N steps, a fresh process-like restart, then N more (with dropout)."""
    straight = tmp_path / "straight"
    Trainer(small_model(), config(), PatternData(), straight, val_data=PatternData()).fit()

    split = tmp_path / "split"

    class Crash(Exception):
        pass

    class CrashingData(PatternData):
        def get_batch(self, *args, step, **kw):
            if step == 6:  # after the step-4 checkpoint, two more steps logged, then a crash
                raise Crash
            return super().get_batch(*args, step=step, **kw)

    with pytest.raises(Crash):
        Trainer(small_model(), config(), CrashingData(), split, val_data=PatternData()).fit()
    assert len(losses(split)) == 6
    # The resumed trainer starts from a different random init: everything must come from disk.
    resumed = Trainer(small_model(seed=99), config(), PatternData(), split, val_data=PatternData())
    summary = resumed.fit()
    assert summary["resumed_from"] == 4

    a, b = losses(straight), losses(split)
    assert [s for s, _, _ in b] == list(range(1, 9))
    assert [r[:2] for r in a] == [r[:2] for r in b]  # bitwise equal losses
    assert a[-1][2] == b[-1][2]
    m1, m2 = lmforge.load(straight), lmforge.load(split)
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k


def test_resume_after_a_crash_mid_write_drops_the_cut_off_line(tmp_path):
    """A crash while a metrics line was being written leaves it cut off; resuming keeps the
    lines up to the checkpoint, drops that line, and the metrics end as an uninterrupted run's."""
    straight = tmp_path / "straight"
    Trainer(small_model(), config(), PatternData(), straight, val_data=PatternData()).fit()

    class CrashingData(PatternData):
        def get_batch(self, *args, step, **kw):
            if step == 6:
                raise KeyboardInterrupt
            return super().get_batch(*args, step=step, **kw)

    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        Trainer(small_model(), config(), CrashingData(), split, val_data=PatternData()).fit()
    with open(split / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 3.1')  # the line being written when the process died
    resumed = Trainer(small_model(seed=99), config(), PatternData(), split, val_data=PatternData())
    assert resumed.fit()["resumed_from"] == 4
    assert [r[:2] for r in losses(split)] == [r[:2] for r in losses(straight)]


def test_training_reduces_loss_and_writes_run_dir(tmp_path, capsys):
    summary = Trainer(
        small_model(dropout=0.0),
        config(steps=30, lr=3e-2, save_every=10, log_every=10, eval_every=10),
        PatternData(),
        tmp_path,
        val_data=PatternData(),
    ).fit()
    rec = losses(tmp_path)
    # Without a terminal (captured here) progress is a plain line every log_every steps.
    logged = [x for x in capsys.readouterr().err.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in logged] == ["10/30", "20/30", "30/30"]
    assert f"loss {rec[9][1]:.3f} val_loss {rec[9][2]:.3f}" in logged[0]
    assert rec[-1][1] < 0.5 * rec[0][1]
    assert summary["final_val_loss"] < math.log(50) / 2
    assert summary["tokens_seen"] == 30 * 4 * 16
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000030"
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_0000020", "step_0000030"]
    model = lmforge.load(tmp_path)
    assert not model.training


def test_grad_accumulation_matches_large_batch(tmp_path):
    class Fixed(PatternData):
        def get_batch(self, batch_size, seq_len, *, seed, step, micro_step=0):
            x, y = super().get_batch(8, seq_len, seed=seed, step=step)
            half = slice(micro_step * 4, micro_step * 4 + 4) if batch_size == 4 else slice(None)
            return x[half], y[half]

    a = Trainer(small_model(dropout=0.0), config(batch_size=8), Fixed(), tmp_path / "a")
    b = Trainer(
        small_model(dropout=0.0), config(batch_size=4, grad_accum=2), Fixed(), tmp_path / "b"
    )
    for t in (a, b):
        t.train_step()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_cosine_schedule_formula():
    kw = dict(peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert cosine_schedule(0, **kw) == pytest.approx(0.1)
    assert cosine_schedule(9, **kw) == pytest.approx(1.0)
    assert cosine_schedule(10, **kw) == pytest.approx(1.0)
    assert cosine_schedule(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine_schedule(110, **kw) == pytest.approx(0.1)
    assert cosine_schedule(500, **kw) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = Transformer(
        ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, bias=True, norm="layernorm")
    )
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.ndim == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()  # the tied embedding counted once


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    model = small_model()
    path = tmp_path / "ckpt"
    save_model(model, path)
    before = (path / "model.safetensors").read_bytes()

    class Boom(RuntimeError):
        pass

    def exploding_state(directory):
        (directory / "partial.bin").write_bytes(b"x" * 10)
        raise Boom("disk full")

    with pytest.raises(Boom):
        save_model(small_model(seed=1), path, train_state=exploding_state)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    lmforge.load(path)


def test_truncated_and_foreign_checkpoints_are_reported(tmp_path):
    path = tmp_path / "ckpt"
    save_model(small_model(), path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        lmforge.load(path)
    (path / "config.yaml").write_text("hidden_size: 12\n")
    with pytest.raises(CheckpointError, match="not a valid lmforge model config.*hidden_size"):
        lmforge.load(path)
    with pytest.raises(CheckpointError, match="is not a model"):
        lmforge.load(tmp_path)


def test_resume_refuses_a_different_model(tmp_path):
    Trainer(small_model(), config(steps=4), PatternData(), tmp_path).fit()
    other = Transformer(
        ModelConfig(vocab_size=50, d_model=64, n_layers=2, n_heads=4, max_seq_len=32)
    )
    with pytest.raises(CheckpointError, match="model config differs"):
        Trainer(other, config(), PatternData(), tmp_path).fit()


def test_resume_refuses_other_trainable_parameters(tmp_path):
    Trainer(small_model(), config(steps=4), PatternData(), tmp_path).fit()
    model = small_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("blocks.0."))  # e.g. a run that trains only some weights
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        Trainer(model, config(steps=8), PatternData(), tmp_path).fit()


def test_time_limit_stops_early_with_a_final_checkpoint(tmp_path):
    summary = Trainer(
        small_model(),
        config(steps=1000, time_limit_s=1e-9),
        PatternData(),
        tmp_path,
        val_data=PatternData(),
    ).fit()
    assert summary["steps"] == 1 and summary["stopped_by_time_limit"]
    assert summary["final_val_loss"] is not None
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000001"


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path):
    fp32 = Trainer(small_model(dropout=0.0), config(steps=3), PatternData(), tmp_path / "a")
    bf16 = Trainer(
        small_model(dropout=0.0), config(steps=3, precision="bf16"), PatternData(), tmp_path / "b"
    )
    a, b = fp32.train_step()[0], bf16.train_step()[0]
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert a != b and abs(a - b) < 0.05  # bf16 matmuls: close to fp32, not identical


def test_rerunning_a_finished_run_is_a_no_op_that_still_reports(tmp_path):
    first = Trainer(small_model(), config(), PatternData(), tmp_path, val_data=PatternData()).fit()
    again = Trainer(
        small_model(seed=5), config(), PatternData(), tmp_path, val_data=PatternData()
    ).fit()
    assert again["resumed_from"] == 8 and again["steps"] == 8
    assert again["final_val_loss"] == first["final_val_loss"]
    assert len(losses(tmp_path)) == 8


def test_wrap_hook_is_what_training_calls(tmp_path):
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(x.shape)
            return self.inner(x)

    trainer = Trainer(
        small_model(),
        config(steps=2),
        PatternData(),
        tmp_path,
        val_data=PatternData(),
        wrap=Counting,
    )
    trainer.fit()
    assert calls == [(4, 16), (4, 16)]  # evaluation used the plain model
    assert lmforge.load(tmp_path).state_dict().keys() == trainer.model.state_dict().keys()


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch, capsys):
    def broken_compile(module):
        def forward(*args, **kwargs):
            raise RuntimeError("no C++ compiler")

        return forward

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = Trainer(small_model(), config(steps=3), PatternData(), tmp_path / "a").fit()
    fallback = Trainer(
        small_model(), config(steps=3, compile=True), PatternData(), tmp_path / "b"
    ).fit()
    assert "training eagerly" in capsys.readouterr().err
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert eager["steps"] == fallback["steps"] == 3


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    Trainer(small_model(dropout=0.0), config(steps=3), PatternData(), tmp_path / "a").fit()
    Trainer(
        small_model(dropout=0.0), config(steps=3, compile=True), PatternData(), tmp_path / "b"
    ).fit()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [r[1] for r in a] == pytest.approx([r[1] for r in b], rel=1e-4)
