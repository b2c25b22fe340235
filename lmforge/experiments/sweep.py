"""`lmforge sweep SPEC.yaml`: hyperparameter search over any lmforge command (seed 001: 超参搜索).

Every trial is the command itself, run as a subprocess into its own ordinary run directory
(`OUT/trials/trial-NNNN/`), so a trial is reproducible by its command line alone and is listed by
`lmforge runs`. Optuna (Akiba et al. 2019) proposes the values (grid, random or TPE) and keeps the
study in SQLite (`OUT/study.db`), which makes a sweep resumable: finished trials are never
repeated, and a trial cut short by a crash is re-queued into its own directory, where the command
resumes from its last checkpoint. While a trial runs its `metrics.jsonl` is read back and reported
to Optuna's pruner (median rule or successive halving), which stops hopeless trials early;
a trial whose loss is no longer finite is stopped at once.

Several `lmforge sweep` processes pointed at one `storage` URL (the SQLite file on a shared disk
for a few workers, a PostgreSQL/MySQL URL for many, e.g. one per Slurm array task or torchrun
node) share the study and split its trials between them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.config import field_, from_dict, load_yaml, merge, save_yaml, set_dotted
from lmforge.errors import ConfigError
from lmforge.experiments.space import Param, field_type, grid_size, parse_space

# Commands a trial cannot be: they manage runs rather than produce one.
_NOT_SWEEPABLE = ("sweep", "runs")


@dataclass
class SweepConfig:
    """Search the config fields of an lmforge command; every trial is an ordinary run."""

    command: str = field_(
        "pretrain", "the lmforge command each trial runs (pretrain, sft, eval...)"
    )
    base: str = field_("", "the command's YAML config every trial starts from (optional)")
    args: dict = field_({}, "fixed overrides for every trial, dotted: {train.steps: 200}")
    space: dict = field_({}, "searched fields: {train.lr: {loguniform: [1.0e-4, 1.0e-2]}}")
    strategy: Literal["grid", "random", "tpe"] = field_(
        "tpe", "grid (every combination), random, or tpe (Bayesian, Optuna's TPE sampler)"
    )
    trials: int = field_(
        16, "trials in all, resumed ones included (grid: 0 = the whole grid)", ge=0
    )
    metric: str = field_(
        "val_loss",
        "what to optimise: a key of the run's metrics.jsonl (its last value), or "
        "FILE.json:dotted.key for a result file (e.g. sft.json:after.exact_match)",
    )
    mode: Literal["min", "max"] = field_("min", "minimise or maximise the metric")
    include_default: bool = field_(
        True, "the first trial runs the searched fields' defaults (joining choice lists)"
    )
    pruner: Literal["none", "median", "halving"] = field_(
        "median", "stop bad trials early: median rule or successive halving (Optuna)"
    )
    prune_on: str = field_(
        "loss", "metrics.jsonl key reported while a trial runs (smoothed), for the pruner"
    )
    prune_window: int = field_(10, "running mean over this many records before reporting", ge=1)
    diverge_factor: float = field_(
        2.0,
        "mode min: stop a trial at once when its smoothed prune_on value exceeds this multiple "
        "of its first one (a loss twice its initial value is diverging); 0: off",
        ge=0,
    )
    prune_warmup_steps: int = field_(0, "no pruning before this step", ge=0)
    prune_startup_trials: int = field_(3, "no pruning until this many trials finished", ge=0)
    parallel: int = field_(1, "trials at once on this machine (each gets cores/parallel)", ge=1)
    storage: str = field_("", "Optuna storage URL (default: sqlite:///OUT/study.db)")
    heartbeat_s: int = field_(
        10, "trial heartbeat; one silent for 3x this is taken as crashed and re-queued", ge=1
    )
    out: str = field_("runs/sweep", "sweep directory: study.db, trials/, sweep_report.md")
    seed: int = field_(0, "seed of the sampler")

    def validate(self) -> None:
        if self.command.split()[:1] and self.command.split()[0] in _NOT_SWEEPABLE:
            raise ConfigError(f"command: '{self.command}' cannot be a trial")
        if self.parallel > (os.cpu_count() or 1):
            raise ConfigError(
                f"parallel={self.parallel} exceeds this machine's {os.cpu_count()} cores"
            )


def command_config_class(command: str) -> type:
    """The config dataclass of `lmforge <command>`."""
    from lmforge.cli import _commands

    commands = _commands()
    if command not in commands:
        import difflib

        close = difflib.get_close_matches(command, list(commands), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; one of: {', '.join(commands)}"
        raise ConfigError(f"command: unknown lmforge command '{command}'{hint}")
    cls = commands[command][0]
    try:
        tp, _ = field_type(cls, "out")
    except ConfigError:
        raise ConfigError(f"command: `lmforge {command}` has no --out directory to sweep") from None
    if tp is not str:
        raise ConfigError(f"command: `lmforge {command}` has no --out directory to sweep")
    return cls


def _nested(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        set_dotted(out, key, value)
    return out


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:  # {train: {lr: 1}} is --train.lr=1
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _arg(value: Any) -> str:
    """A value as the command line's YAML reads it back exactly (floats keep a dot or an
    exponent YAML 1.1 accepts, strings stay strings)."""
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exp = text.split("e")
            text = f"{mantissa}.0e{exp}"
        return text
    if isinstance(value, str) and value and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


class Sweep:
    """One worker of a sweep: asks Optuna for trials, runs them, reports back."""

    def __init__(self, config: SweepConfig) -> None:
        import optuna

        config.validate()
        self.config = config
        self.cls = command_config_class(config.command)
        self.params: list[Param] = parse_space(self.cls, config.space)
        self.fixed = _flat(config.args)
        if "out" in self.fixed:
            raise ConfigError("args.out: each trial's --out is set by the sweep")
        self.out = Path(config.out)
        self.defaults = self._check_trials()
        if config.include_default:
            # A categorical default outside the choices joins them, so trial 0 can run it.
            self.params = [
                dataclasses.replace(p, values=(*p.values, self.defaults[p.name]))
                if p.kind == "choice" and self.defaults[p.name] not in p.values
                else p
                for p in self.params
            ]
        self.target = config.trials
        if config.strategy == "grid":
            size = grid_size(self.params)
            self.target = size if config.trials == 0 else min(config.trials, size)
        elif config.trials == 0:
            raise ConfigError("trials: 0 means the whole grid; give a count for random or tpe")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "trials").mkdir(exist_ok=True)
        save_yaml(config, self.out / "sweep.yaml")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Heartbeats and stale-trial recovery are used here with ask/tell, on purpose (see
        # `run`); a default outside its searched range (an enqueued trial) is intended too.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")
        url = config.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"
        self.storage = optuna.storages.RDBStorage(
            url,
            heartbeat_interval=config.heartbeat_s,
            grace_period=3 * config.heartbeat_s,
            heartbeat_stale_trial_callback=_requeue,
        )
        self.study = optuna.create_study(
            study_name="sweep",
            storage=self.storage,
            direction="minimize" if config.mode == "min" else "maximize",
            sampler=self._sampler(),
            pruner=self._pruner(),
            load_if_exists=True,
        )
        if not self.study.trials:
            if config.strategy == "grid":
                # Every point queued up front (a grid holds the defaults' point: they joined
                # the choices above); ask/tell then just takes them in order, and a resumed
                # sweep finds the rest still queued.
                for point in itertools.product(*(p.grid() for p in self.params)):
                    values = dict(zip([p.name for p in self.params], point))
                    self.study.enqueue_trial(
                        values, user_attrs={"default": values == self.defaults}
                    )
            elif config.include_default:
                self.study.enqueue_trial(self.defaults, user_attrs={"default": True})

    def _check_trials(self) -> dict[str, Any]:
        """Build the command's config for the defaults and both ends of every range, so a bad
        field or value fails now rather than in trial 7. Returns the searched fields' defaults."""
        base = self.trial_config({})  # the base YAML and the fixed args: what "default" means
        defaults = {}
        for p in self.params:
            node = base
            for part in p.name.split("."):
                node = getattr(node, part)
            defaults[p.name] = node
        for p in self.params:
            ends = p.values if p.kind == "choice" else (p.low, p.high)
            for value in ends:
                self.trial_config({**defaults, p.name: value})
        return defaults

    def trial_config(self, values: dict[str, Any], run_dir: str = "x"):
        """The command's validated config for one trial's values."""
        data = load_yaml(self.config.base) if self.config.base else {}
        return from_dict(self.cls, merge(data, _nested({**self.fixed, **values, "out": run_dir})))

    def _sampler(self):
        import optuna

        c = self.config
        if c.strategy in ("grid", "random"):  # (grid points are all queued: nothing to sample)
            return optuna.samplers.RandomSampler(seed=c.seed)
        # Few trials: start modelling after a handful of random ones (Optuna's default is 10).
        startup = max(2, min(10, c.trials // 3))
        return optuna.samplers.TPESampler(seed=c.seed, n_startup_trials=startup)

    def _pruner(self):
        import optuna

        c = self.config
        if c.pruner == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=c.prune_startup_trials, n_warmup_steps=c.prune_warmup_steps
            )
        if c.pruner == "halving":
            return optuna.pruners.SuccessiveHalvingPruner()
        return optuna.pruners.NopPruner()

    def argv(self, values: dict[str, Any], run_dir: Path) -> list[str]:
        """The trial's command line (what the report prints to rerun it)."""
        args = [f"--{k}={_arg(v)}" for k, v in {**self.fixed, **values}.items()]
        base = [self.config.base] if self.config.base else []
        return ["lmforge", *self.config.command.split(), *base, *args, f"--out={run_dir}"]

    def finished(self) -> int:
        """Trials that count toward the target: complete, pruned, or failed on their own
        (a trial interrupted by a crash was re-queued and does not count)."""
        from optuna.trial import TrialState

        return sum(
            t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and "failure" in t.user_attrs)
            for t in self.study.get_trials(deepcopy=False)
        )

    def run(self) -> dict:
        import optuna

        optuna.storages.fail_stale_trials(self.study)  # crashed workers' trials: re-queued
        threads = max(1, (os.cpu_count() or 1) // self.config.parallel)
        running: dict[int, _Running] = {}
        checked = time.monotonic()
        try:
            while True:
                if time.monotonic() - checked > self.config.heartbeat_s:
                    # Another worker's (or a just-crashed run's) trial may go stale meanwhile.
                    optuna.storages.fail_stale_trials(self.study)
                    checked = time.monotonic()
                while len(running) < self.config.parallel and (
                    self.finished() + len(running) < self.target
                ):
                    job = self._start(threads)
                    running[job.trial.number] = job
                if not running:
                    break
                for number in list(running):
                    if self._poll(running[number]):
                        del running[number]
                time.sleep(0.2)
        except BaseException:
            # Ctrl-C, SIGTERM, an error here: stop the trials and re-queue them at once, so
            # the next `lmforge sweep` resumes them without waiting out the heartbeat.
            from optuna.trial import TrialState

            for job in running.values():
                job.stop()
                self.study.tell(job.trial, state=TrialState.FAIL, skip_if_finished=True)
                _requeue(self.study, self.study.trials[job.trial.number])
            raise
        from lmforge.experiments.report import write_sweep_report

        return write_sweep_report(self)

    def _start(self, threads: int) -> _Running:
        trial = self.study.ask()
        values = {p.name: p.suggest(trial) for p in self.params}
        run_dir = Path(
            trial.user_attrs.get("dir") or self.out / "trials" / f"trial-{trial.number:04d}"
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("dir", str(run_dir))
        argv = self.argv(values, run_dir)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LMFORGE_DEBUG": ""}
        record = {"number": trial.number, "values": values, "argv": argv, "threads": threads}
        (run_dir / "trial.json").write_text(json.dumps(record, indent=2) + "\n")
        log = open(run_dir / "trial.log", "a")  # noqa: SIM115 (closed by _Running.stop/poll)
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge", *argv[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stopping it stops its workers
        )
        print(f"trial {trial.number}: {' '.join(argv[1:])}", flush=True)
        return _Running(trial, proc, run_dir, log)

    def _poll(self, job: _Running) -> bool:
        """Report new values, prune or finish; True once the trial is over."""
        from optuna.trial import TrialState

        c, study = self.config, self.study
        if time.monotonic() - job.beat >= c.heartbeat_s / 2:
            self.storage.record_heartbeat(job.trial._trial_id)
            job.beat = time.monotonic()
        for step, value in job.new_values(c.prune_on, c.prune_window):
            worst = math.inf if c.mode == "min" else -math.inf
            job.trial.report(value if math.isfinite(value) else worst, step)
            if job.first is None and math.isfinite(value):
                job.first = value
            reason = None
            if not math.isfinite(value):
                reason = "not finite"
            elif (
                c.mode == "min"
                and c.diverge_factor
                and value > c.diverge_factor * (job.first or 0) > 0
            ):
                reason = f"diverging ({value:.4g} > {c.diverge_factor:g} x {job.first:.4g})"
            elif job.trial.should_prune():
                reason = "pruned"
            if reason:
                job.stop()
                job.trial.set_user_attr("stopped", f"{reason} at step {step}")
                study.tell(job.trial, state=TrialState.PRUNED)
                print(f"trial {job.trial.number}: {reason} at step {step}", flush=True)
                return True
        code = job.proc.poll()
        if code is None:
            return False
        job.close()
        if code != 0:
            tail = (job.run_dir / "trial.log").read_text(errors="replace").strip().splitlines()
            job.trial.set_user_attr("failure", f"exit {code}: {tail[-1] if tail else ''}")
            study.tell(job.trial, state=TrialState.FAIL)
            print(f"trial {job.trial.number}: failed ({tail[-1] if tail else code})", flush=True)
            return True
        value = read_metric(job.run_dir, c.metric)
        if value is None:
            job.trial.set_user_attr("failure", f"metric {c.metric} not written")
            study.tell(job.trial, state=TrialState.FAIL)
            raise ConfigError(
                f"metric: `lmforge {c.command}` did not write '{c.metric}' in {job.run_dir}; "
                f"it writes: {', '.join(available_metrics(job.run_dir)) or 'nothing readable'}"
            )
        study.tell(job.trial, value)
        print(f"trial {job.trial.number}: {c.metric}={value:.6g}", flush=True)
        return True


class _Running:
    """A trial's subprocess and how far its metrics.jsonl has been read."""

    def __init__(self, trial, proc: subprocess.Popen, run_dir: Path, log) -> None:
        self.trial, self.proc, self.run_dir, self.log = trial, proc, run_dir, log
        self.offset, self.window, self.beat, self.first, self.step = 0, [], 0.0, None, -1

    def new_values(self, key: str, window: int) -> list[tuple[int, float]]:
        """(step, running mean of the last `window` values of `key`) for records added since
        the last call; a record with a non-finite value reports it as is."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        with open(path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            value = record.get(key)
            if not isinstance(value, (int, float)) or record.get("step", -1) <= self.step:
                continue  # (a resumed run writes the steps after its checkpoint again)
            self.step = int(record["step"])
            self.window = (self.window + [float(value)])[-window:]
            mean = sum(self.window) / len(self.window)
            out.append((int(record["step"]), mean if math.isfinite(value) else float(value)))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.close()

    def close(self) -> None:
        self.log.close()


def _requeue(study, trial) -> None:
    """Queue an interrupted trial again with the same values and run directory."""
    study.enqueue_trial(
        trial.params, user_attrs={"dir": trial.user_attrs.get("dir"), "retry_of": trial.number}
    )


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def read_metric(run_dir: str | Path, metric: str) -> float | None:
    """A run's final value of `metric`: the last value of that key in metrics.jsonl, or
    `FILE.json:dotted.key` in one of the run's JSON results."""
    run_dir = Path(run_dir)
    if ":" in metric:
        name, key = metric.split(":", 1)
        try:
            value = _lookup(json.loads((run_dir / name).read_text()), key)
        except (OSError, ValueError):
            return None
        return float(value) if isinstance(value, (int, float)) else None
    value = None
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                v = json.loads(line).get(metric)
            except ValueError:
                continue
            if isinstance(v, (int, float)):
                value = float(v)
    return value


def available_metrics(run_dir: str | Path) -> list[str]:
    """Keys a run wrote that `metric` can name (for the error when it names none of them)."""
    run_dir = Path(run_dir)
    keys: dict[str, None] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines()[-50:]:
            try:
                keys.update(dict.fromkeys(json.loads(line)))
            except ValueError:
                continue
    for file in sorted(run_dir.glob("*.json")):
        if file.name == "trial.json":
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            keys.update(dict.fromkeys(f"{file.name}:{k}" for k in _numeric_keys(data)))
    return list(keys)


def _numeric_keys(data: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out += _numeric_keys(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(prefix + key)
    return out


def sweep_command(config: SweepConfig) -> dict:
    """`lmforge sweep`: run (or resume) the sweep, write its report, print the best trial."""
    result = Sweep(config).run()
    best = result.get("best")
    if best:
        print(f"best: {config.metric}={best['value']:.6g} in {best['dir']}")
        print(f"report: {result['report']}")
    return result
