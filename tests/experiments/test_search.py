"""End-to-end sweeps over `lmforge pretrain` on a tiny model (each trial a real subprocess)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmforge.config import from_dict
from lmforge.errors import ConfigError
from lmforge.experiments.sweep import (
    Sweep,
    SweepConfig,
    available_metrics,
    read_metric,
    sweep_command,
)


def tiny_pretrain_args(shards, steps=30):
    return {
        "data": str(shards),
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 64, "max_seq_len": 32},
        "train": {
            "steps": steps,
            "batch_size": 8,
            "seq_len": 32,
            "eval_every": 10,
            "eval_batches": 4,
            "save_every": 10,
            "log_every": 10,
        },
    }


def spec(tmp_path, shards, **kw) -> SweepConfig:
    data = {"command": "pretrain", "args": tiny_pretrain_args(shards), "out": str(tmp_path / "sw")}
    return from_dict(SweepConfig, {**data, **kw})


def test_grid_sweep_beats_default_prunes_divergence_and_reruns_exactly(tmp_path, shards):
    # The default lr (3e-4) is far too small for 30 steps; 50.0 diverges.
    config = spec(
        tmp_path,
        shards,
        space={"train.lr": {"choice": [3e-3, 3e-2, 50.0]}},
        strategy="grid",
        trials=0,
        parallel=2,
        args={
            **tiny_pretrain_args(shards, steps=200),
            "train": {**tiny_pretrain_args(shards)["train"], "steps": 200, "eval_every": 100},
        },
    )
    result = sweep_command(config)
    trials = {t["number"]: t for t in result["trials"]}
    assert len(trials) == 4
    default, best = result["default"], result["best"]
    assert best["value"] < default["value"] - 0.1
    assert best["params"] == {"train.lr": 3e-2}
    # The diverging trial was stopped early, by the loss turning non-finite or by the pruner.
    diverged = next(t for t in trials.values() if t["params"]["train.lr"] == 50.0)
    assert diverged["state"] == "pruned" and "diverging" in diverged["note"], diverged
    lines = (Path(diverged["dir"]) / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert max(steps) < 200
    assert result["pruned_not_finite"] == 1
    report = (tmp_path / "sw" / "sweep_report.md").read_text()
    assert "better by" in report and (tmp_path / "sw" / "parallel.png").is_file()

    # The printed rerun command reproduces the best trial's loss exactly.
    env_assignment, _lmforge, *args = shlex.split(best["rerun"])
    threads = env_assignment.removeprefix("OMP_NUM_THREADS=")
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    subprocess.run(
        [sys.executable, "-m", "lmforge", *args], check=True, env=env, capture_output=True
    )
    rerun_dir = best["dir"] + "-rerun"
    assert read_metric(rerun_dir, "val_loss") == best["value"]


def test_killed_sweep_resumes_without_repeating_finished_trials(tmp_path, shards):
    config = spec(
        tmp_path,
        shards,
        space={"train.lr": {"loguniform": [1e-3, 1e-1]}},
        strategy="random",
        trials=3,
        include_default=False,
        pruner="none",
        heartbeat_s=1,
        args={**tiny_pretrain_args(shards, steps=60)},
    )
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(vars(config)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "sweep", str(tmp_path / "spec.yaml")],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    second = tmp_path / "sw" / "trials" / "trial-0001"
    deadline = time.time() + 120
    # Kill the whole sweep (and its running trial) once trial 1 has checkpointed.
    while not (second / "checkpoints" / "latest").is_file():
        assert time.time() < deadline and proc.poll() is None, "sweep did not reach trial 1"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = tmp_path / "sw" / "trials" / "trial-0000" / "metrics.jsonl"
    before = first.read_bytes(), first.stat().st_mtime_ns
    # Trial 1's heartbeat goes stale after 3 x heartbeat_s (timestamps may be whole seconds).
    time.sleep(5)

    result = Sweep(config).run()
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before  # not run again
    done = [t for t in result["trials"] if t["state"] == "complete"]
    assert len(done) == 3
    retry = next(t for t in result["trials"] if t["retry_of"] == 1)
    assert retry["dir"] == str(second)  # resumed in its own directory
    log = (second / "trial.log").read_text()
    assert "resum" in log.lower() or read_metric(second, "val_loss") is not None


def test_metric_the_command_never_writes_is_an_error(tmp_path, shards):
    config = spec(
        tmp_path,
        shards,
        space={"train.lr": {"choice": [1e-2]}},
        strategy="grid",
        include_default=False,
        metric="val_accuracy",
        args=tiny_pretrain_args(shards, steps=5),
    )
    with pytest.raises(ConfigError, match="did not write 'val_accuracy'.*val_loss"):
        Sweep(config).run()


def test_bad_specs_fail_before_any_trial(tmp_path, shards):
    with pytest.raises(ConfigError, match="unknown lmforge command 'pretrian'.*pretrain"):
        Sweep(spec(tmp_path, shards, command="pretrian", space={"train.lr": {"choice": [1]}}))
    with pytest.raises(ConfigError, match="did you mean 'train.warmup_steps'"):
        Sweep(spec(tmp_path, shards, space={"train.warmup_step": {"int": [0, 10]}}))
    with pytest.raises(ConfigError, match="has no grid"):
        Sweep(spec(tmp_path, shards, strategy="grid", space={"train.lr": {"uniform": [0.1, 1]}}))
    with pytest.raises(ConfigError, match="set by the sweep"):
        Sweep(spec(tmp_path, shards, args={"out": "x"}, space={"train.lr": {"choice": [1]}}))
    # A value the command's config rejects (heads that do not divide d_model=32) fails at once.
    with pytest.raises(ConfigError, match=r"divisible by n_heads \(3\)"):
        Sweep(spec(tmp_path, shards, space={"model.n_heads": {"choice": [2, 3]}}))
    assert not (tmp_path / "sw" / "trials").exists()


def test_read_metric_from_metrics_and_result_files(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "val_loss": 2.5}, {"step": 3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "sft.json").write_text(json.dumps({"after": {"exact_match": 0.25}, "n": "x"}))
    assert read_metric(tmp_path, "loss") == 2.0  # the last value written
    assert read_metric(tmp_path, "val_loss") == 2.5
    assert read_metric(tmp_path, "sft.json:after.exact_match") == 0.25
    assert read_metric(tmp_path, "sft.json:n") is None  # not a number
    assert read_metric(tmp_path, "missing.json:a") is None
    assert read_metric(tmp_path, "accuracy") is None
    assert set(available_metrics(tmp_path)) == {
        "step",
        "loss",
        "val_loss",
        "sft.json:after.exact_match",
    }
