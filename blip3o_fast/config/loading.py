"""Loading a run config: YAML files with `include:`, `section.key=value` overrides, typed coercion.

A run config is one YAML file whose sections match `RunConfig`'s fields. It may list other YAML
files under `include:` (paths relative to it, merged first, later ones win), which is how the
`blip3o_fast/configs/model/*.yaml` sizes and `blip3o_fast/configs/task/*.yaml` tasks are composed.
Command-line overrides are `section.key=value` with YAML-parsed values. Unknown keys are rejected with the
nearest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .schema import ConfigError, RunConfig


def _nearest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(valid)})"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config include cycle through {path}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    merged: dict = {}
    for inc in raw.pop("include", None) or []:
        merged = _merge(merged, _read_yaml(path.parent / inc, seen + (path,)))
    return _merge(merged, raw)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """YAML value -> the field's type, where that is unambiguous (ints for floats, lists for tuples)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key) if len(inner) == 1 else value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float and not isinstance(value, float):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, key) for v in value)
    return value


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}{_nearest(key, list(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} must be a mapping of its keys, got {value!r}")
            kwargs[key] = _build(hint, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    out = _merge({}, values)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return out


def from_dict(values: dict) -> RunConfig:
    return _build(RunConfig, values, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The RunConfig of a YAML file (or the defaults) with `section.key=value` overrides applied."""
    values = _read_yaml(Path(path)) if path is not None else {}
    return from_dict(apply_overrides(values, list(overrides or [])))
