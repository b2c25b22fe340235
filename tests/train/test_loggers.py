"""Optional TensorBoard / Weights & Biases logging of the metrics.jsonl records."""

import importlib.util
import json

import pytest
from test_trainer import PatternData, config, small_model

from lmforge.errors import ConfigError
from lmforge.train import loggers
from lmforge.train.trainer import Trainer


def records(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run(out, **kw):
    base = dict(steps=4, eval_every=0, save_every=0)
    return Trainer(small_model(dropout=0.0), config(**{**base, **kw}), PatternData(), out).fit()


@pytest.mark.parametrize(
    "option,package", [("log_tensorboard", "tensorboard"), ("log_wandb", "wandb")]
)
def test_asking_for_a_missing_logger_is_a_clear_error(monkeypatch, tmp_path, option, package):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == package else find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match=f"train.{option}=true but the `{package}` package"):
        Trainer(small_model(), config(**{option: True}), PatternData(), tmp_path)


class RecordingSinks:
    """Stands in for MetricSinks' TensorBoard writer: keeps every add_scalar call."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_every_numeric_field_of_every_record_reaches_the_sinks(monkeypatch, tmp_path):
    writer, real_sinks = RecordingSinks(), loggers.MetricSinks

    def sinks(out_dir, *, tensorboard, wandb, config):
        assert tensorboard and not wandb and config["steps"] == 4
        made = real_sinks(out_dir, tensorboard=False, wandb=False, config=config)
        made.tb = writer
        return made

    monkeypatch.setattr(loggers, "check_available", lambda *a: None)
    monkeypatch.setattr(loggers, "MetricSinks", sinks)
    run(tmp_path, log_tensorboard=True)
    expected = [
        (f"train/{k}", float(v), r["step"])
        for r in records(tmp_path)
        for k, v in r.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    assert writer.scalars == expected
    assert [step for tag, _, step in writer.scalars if tag == "train/loss"] == [1, 2, 3, 4]
    assert writer.closed


def test_tensorboard_event_file_holds_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, log_tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in records(tmp_path)]


def test_wandb_offline_run_is_written(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(tmp_path, log_wandb=True)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
