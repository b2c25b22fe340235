"""Typed dataclass configs: YAML load/save, dotted command-line overrides, validation, help.

Every command owns one dataclass tree. Fields are declared with `field_(default, doc, ge=, le=)` so
that `--help` can list them and loading can reject bad values with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from lmforge.errors import ConfigError

T = TypeVar("T")


def field_(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> Any:
    """A dataclass field carrying its help text and numeric bounds."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value)
    return type(value)(value)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_describe(a) for a in get_args(tp) if a is not ...)}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError:
                pass
        raise ConfigError(f"{name}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{name}: {value!r} is not one of {_describe(tp)}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value] if origin is list else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected {_describe(tp)}, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not ...:
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{name}: expected a mapping, got {value!r}")
    raise ConfigError(f"{name}: unsupported config type {tp!r}")


def _check_bounds(value: Any, meta: dict, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if meta.get("ge") is not None and value < meta["ge"]:
        raise ConfigError(f"{name}: must be >= {meta['ge']}, got {value}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(f"{name}: must be > {meta['gt']}, got {value}")
    if meta.get("le") is not None and value > meta["le"]:
        raise ConfigError(f"{name}: must be <= {meta['le']}, got {value}")


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Build and validate a config dataclass from a (possibly nested) mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key not in fields:
            raise _unknown_key(cls, key, prefix)
        default = fields[key].default_factory  # a nested config's own default instance
        if isinstance(value, dict) and default is not dataclasses.MISSING:
            base = default()
            if dataclasses.is_dataclass(base):
                # `--train.steps=150` changes one field of the command's default TrainConfig
                # (say `lmforge run`'s demo settings), not of the class defaults.
                value = merge(to_dict(base), value)
        value = _coerce(value, hints[key], prefix + key)
        _check_bounds(value, fields[key].metadata, prefix + key)
        kwargs[key] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}") from None
    return obj


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists, for YAML)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(config)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def save_yaml(config: Any, path: str | Path) -> None:
    """Write a config as YAML (atomically: temp file then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """`set_dotted(d, "model.d_model", 512)` sets d["model"]["d_model"]."""
    keys = dotted.replace("-", "_").split(".")
    for key in keys[:-1]:
        node = data.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: '{key}' is not a section")
        data = node
    data[keys[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Parse `--a.b=value` / `--a.b value` / `--flag` into a nested dict (values read as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                raw = args[i + 1]
                i += 1
            else:
                raw = "true"
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except ValueError:  # a date-like value that is no date (2024-13-01): keep the text
            value = raw
        except yaml.YAMLError as e:
            if raw.lstrip().startswith(("[", "{")):
                # A list or mapping that does not parse would otherwise become one string.
                problem = str(getattr(e, "problem", "") or e).strip()
                raise ConfigError(
                    f"--{key}: cannot read {raw!r} as a YAML list or mapping ({problem}); "
                    "quote items that contain ':', '?', ',' or '#', e.g. [\"What is X?\"]"
                ) from None
            value = raw
        set_dotted(out, key, value)
        i += 1
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values of `update` win."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(cls: type[T], yaml_path: str | Path | None = None, args: list[str] | None = None) -> T:
    """A command's config: defaults, then the YAML file, then command-line overrides."""
    data = load_yaml(yaml_path) if yaml_path else {}
    data = merge(data, parse_overrides(args or []))
    return from_dict(cls, data)


def help_text(cls: type, prefix: str = "") -> str:
    """One line per field (nested sections flattened): `--name  TYPE  (default: X)  doc`."""
    lines = []
    hints = _hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n  [{prefix}{f.name}] {f.metadata.get('doc', '')}")
            lines.append(help_text(tp, prefix=f"{prefix}{f.name}."))
            continue
        name = f"--{prefix}{f.name}"
        lines.append(f"  {name:<34} {_describe(tp):<24} (default: {value!r})")
        doc = f.metadata.get("doc")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)
