"""Loading a run config: YAML files with `include:`, `section.key=value` overrides, typed coercion.

A run config is one YAML file whose sections match `RunConfig`'s fields, given as a path or as the
name of a config shipped in the package (`demo`, `eva_to_clip_base`, `model/base`: the files of
`blip3o_fast/configs/`, package data, so names work from an installed wheel). It may list other YAML
files under `include:` (relative to it, else to the shipped configs; merged first, later ones win),
which is how the `model/*.yaml` sizes and `task/*.yaml` tasks are composed. Command-line overrides
are `section.key=value` with YAML-parsed values. Unknown keys are rejected with the nearest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
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


def shipped_dir() -> Path:
    """The folder of the configs shipped as package data."""
    return Path(str(importlib.resources.files("blip3o_fast") / "configs"))


def shipped_names() -> list[str]:
    """Every shipped config by name: the run configs first (`demo`), then the parts (`model/base`)."""
    root = shipped_dir()
    names = [p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")]
    return sorted(names, key=lambda n: ("/" in n, n))


def _shipped(name: str) -> Path | None:
    stem = name[:-5] if name.endswith(".yaml") else name
    return shipped_dir() / f"{stem}.yaml" if stem in shipped_names() else None


def resolve_config(name_or_path: str | Path) -> Path:
    """An existing file as given, else the shipped config of that name; a one-line ConfigError otherwise."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = _shipped(str(name_or_path))
    if shipped is not None:
        return shipped
    runs = [n for n in shipped_names() if "/" not in n]
    if "/" in str(name_or_path) or path.suffix in (".yaml", ".yml"):
        raise ConfigError(f"config file {path} does not exist (nor is it a shipped config name): fix the path, or "
                          f"give a name from `blip3o-fast config list`")
    raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor a shipped config name"
                      f"{_nearest(str(name_or_path), runs)}: give a YAML path or a name from `blip3o-fast config list`")


def _include(parent: Path, inc: str) -> Path:
    """An include relative to the including file, else a shipped config (so a copied template still composes)."""
    local = parent / inc
    if local.is_file():
        return local
    return _shipped(str(inc)) or local


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
        merged = _merge(merged, _read_yaml(_include(path.parent, inc), seen + (path,)))
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
    """The RunConfig of a YAML file or shipped config name (or the defaults) with `section.key=value` overrides."""
    values = _read_yaml(resolve_config(path)) if path is not None else {}
    return from_dict(apply_overrides(values, list(overrides or [])))
