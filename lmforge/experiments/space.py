"""Search spaces over a command's config fields, checked against the command's dataclass.

A space maps dotted field names to one distribution each (YAML):

    train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    train.warmup_steps: {int: [0, 100], step: 10}
    model.mlp: {choice: [swiglu, gelu]}
    train.weight_decay: {uniform: [0.0, 0.2]}

Names are validated before any trial runs (a typo gets the nearest valid name), values are
coerced and bounds-checked exactly as `lmforge <command> --name=value` would do it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any

from lmforge.config import _check_bounds, _coerce
from lmforge.errors import ConfigError

KINDS = ("choice", "uniform", "loguniform", "int")


@dataclass(frozen=True)
class Param:
    """One searched field: `kind` in KINDS; `values` for choice, (low, high) otherwise."""

    name: str
    kind: str
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0
    step: int = 1
    log: bool = False

    def suggest(self, trial) -> Any:
        """Draw this parameter from an Optuna trial."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=self.step, log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "loguniform")

    def grid(self) -> list:
        """Every value, for grid search (continuous ranges have no grid)."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, self.step))
        raise ConfigError(
            f"space.{self.name}: a {self.kind} range has no grid; give {{choice: [...]}} values "
            "or use strategy random or tpe"
        )


def field_type(cls: type, dotted: str) -> tuple[Any, dict]:
    """The annotation and field metadata of `dotted` (e.g. "train.lr") in the dataclass `cls`,
    or a ConfigError naming the nearest valid field."""
    node, parts = cls, dotted.replace("-", "_").split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            prefix = ".".join(parts[:i])
            valid = [f"{prefix}.{n}" if prefix else n for n in fields]
            close = difflib.get_close_matches(dotted, all_fields(cls), n=1, cutoff=0.5)
            close = close or difflib.get_close_matches(part, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(valid)}"
            raise ConfigError(f"space: '{dotted}' is not a field of the command's config{hint}")
        tp = typing.get_type_hints(node)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"space: '{dotted}' is a section; name one of its fields")
            return tp, dict(fields[part].metadata)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"space: '{'.'.join(parts[: i + 1])}' is not a section")
        node = tp
    raise AssertionError("unreachable")


def all_fields(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf field name of a config dataclass."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += all_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _check_value(cls: type, name: str, value: Any) -> Any:
    tp, meta = field_type(cls, name)
    value = _coerce(value, tp, f"space.{name}")
    _check_bounds(value, meta, f"space.{name}")
    return value


def parse_space(cls: type, space: dict[str, Any]) -> list[Param]:
    """Validate a space mapping against the config dataclass `cls`."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("space: give at least one field to search, e.g. {train.lr: {...}}")
    params = []
    for name, spec in space.items():
        field_type(cls, name)  # the name exists
        if not isinstance(spec, dict) or not (set(spec) & set(KINDS)):
            raise ConfigError(
                f"space.{name}: expected one of {{choice: [...]}}, {{uniform: [lo, hi]}}, "
                f"{{loguniform: [lo, hi]}}, {{int: [lo, hi]}}; got {spec!r}"
            )
        kinds = [k for k in KINDS if k in spec]
        extra = set(spec) - set(KINDS) - {"step", "log"}
        if len(kinds) > 1 or extra:
            raise ConfigError(f"space.{name}: one distribution and step/log only; got {spec!r}")
        kind = kinds[0]
        if kind == "choice":
            values = spec["choice"]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"space.{name}: choice needs a non-empty list, got {values!r}")
            values = tuple(_check_value(cls, name, v) for v in values)
            params.append(Param(name, kind, values=values))
            continue
        bounds = spec[kind]
        if not (isinstance(bounds, list) and len(bounds) == 2):
            raise ConfigError(f"space.{name}: {kind} needs [low, high], got {bounds!r}")
        low, high = (_check_value(cls, name, b) for b in bounds)
        if not isinstance(low, (int, float)) or isinstance(low, bool):
            raise ConfigError(f"space.{name}: {kind} ranges need a numeric field")
        if not low < high:
            raise ConfigError(f"space.{name}: empty range [{low}, {high}] (low must be < high)")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"space.{name}: loguniform needs low > 0, got {low}")
        step = spec.get("step", 1)
        if kind == "int" and (not isinstance(low, int) or not isinstance(step, int) or step < 1):
            raise ConfigError(f"space.{name}: int ranges need integer bounds and step >= 1")
        params.append(
            Param(name, kind, low=low, high=high, step=step, log=bool(spec.get("log", False)))
        )
    return params


def grid_size(params: list[Param]) -> int:
    return math.prod(len(p.grid()) for p in params)
