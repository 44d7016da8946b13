"""Loading a run configuration: YAML files, dotted overrides and the type checks of each key.

:func:`load_config` reads a YAML file that mirrors :class:`nrfm.config.Config`, applies dotted overrides
(``{"pretraining.epochs": 2}``; :func:`parse_override` reads them from the command line as ``key=value``) and
builds the frozen dataclasses with :func:`config_from_dict`: every value is checked against its field's annotation
and converted to the dataclass's own types, then each section's ``_check`` runs. An unknown key, a wrong type or an
out-of-range value raises :class:`~nrfm.errors.ConfigError` naming the file and the dotted key, e.g.
``configs/my.yaml: pretraining.epochs: must be >= 1, got 0``.

Example::

    cfg = load_config("configs/smoke.yaml", overrides={"seed": 1})
    cfg.pretraining.epochs
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from nrfm.config import Config, _Invalid
from nrfm.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the dataclass's own types."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _Invalid(key, f"expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Invalid(key, f"expected a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except _Invalid:
                continue
        raise _Invalid(key, f"wrong type {type(value).__name__} {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise _Invalid(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(key, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(key, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Invalid(key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise _Invalid(key, f"unsupported type {_type_name(tp)}")


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise _Invalid(prefix.rstrip(".") or "<top>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise _Invalid(f"{prefix}{unknown[0]}", f"unknown key; valid keys here: {names}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], tp, f"{prefix}{name}")
    obj = cls(**kwargs)
    try:
        obj._check()
    except _Invalid as err:
        raise _Invalid(f"{prefix}{err.key}", err.message) from None
    return obj


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Build and validate a :class:`Config` from a nested mapping (as read from YAML)."""
    try:
        cfg = _build(Config, data or {}, "")
    except _Invalid as err:
        raise ConfigError(f"{source}: {err.key}: {err.message}") from None
    return dataclasses.replace(cfg, source=source)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load a YAML config, apply dotted ``overrides`` (e.g. ``{"pretraining.epochs": 2}``), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return config_from_dict(data, source=str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` from the command line; the value is read as YAML (``2``, ``true``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
