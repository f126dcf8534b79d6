"""The dataset format (docs/architecture.md §3.9): `manifest.json`, its validation, and the `Dataset` view of a folder.

A dataset is a folder holding `manifest.json`, WebDataset tar shards and optionally `head.safetensors`.
Each shard sample is `<key>.cond.npy` [Nc, Dc], `<key>.target.npy` [Nt, Dt], `<key>.text.npy`
[K, Dg] (when the manifest has `text`) and `<key>.json` {"key", "captions", "source"}. A manifest whose
`streams.target` is null holds conditions only (no `.target.npy`): it can be generated from, not trained on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TASKS
from ..errors import UserError
from ..runtime.files import atomic_write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HEAD_FILE = "head.safetensors"
STATS_FILE = "stats.safetensors"  # per-channel mean/std of the train split (data/stats.py)
DTYPES = ("float16", "float32")
STORAGES = ("float", "int8")  # float: members hold `dtype` values; int8: int8 values + a float32 scale (§3.9.6)
SCALES = ("channel", "token")  # what one int8 scale covers (channel: of each sample; bench/bench_data.py)
# member extensions of one sample in a shard
COND, TARGET, TEXT, META = "cond.npy", "target.npy", "text.npy", "json"


def scale_member(ext: str) -> str:
    """The member holding the int8 scale of a stream member: cond.npy -> cond.scale.npy."""
    return ext[:-len(".npy")] + ".scale.npy"


class DataError(UserError):
    """A dataset that cannot be used as given; the message names the file and the fix."""


@dataclass(frozen=True)
class StreamSpec:
    """One token stream: `tokens` rows of `dim` features, CLS first when `cls`. Stored as `dtype` floats, or
    (`storage="int8"`) as int8 values with a float32 scale per token or per channel, read back as `dtype`."""

    name: str
    model: str
    dim: int
    tokens: int
    cls: bool
    dtype: str = "float16"
    storage: str = "float"
    scale: str = "channel"

    @property
    def int8(self) -> bool:
        return self.storage == "int8"

    @property
    def bytes_per_sample(self) -> int:
        """Payload bytes of one sample's member(s) of this stream (no .npy or tar headers)."""
        if self.int8:
            return self.tokens * self.dim + 4 * (self.tokens if self.scale == "token" else self.dim)
        return self.tokens * self.dim * (2 if self.dtype == "float16" else 4)

    def to_dict(self) -> dict:
        out = {"name": self.name, "model": self.model, "dim": self.dim, "tokens": self.tokens,
               "cls": self.cls, "dtype": self.dtype, "storage": self.storage}
        if self.int8:
            out["scale"] = self.scale
        return out


@dataclass(frozen=True)
class TextSpec:
    """Caption embeddings: up to `max_captions` rows of `dim` features per sample."""

    dim: int
    max_captions: int
    captions_per_sample: int | None = None
    model: str = ""
    dtype: str = "float16"

    def to_dict(self) -> dict:
        return {"dim": self.dim, "captions_per_sample": self.captions_per_sample,
                "max_captions": self.max_captions, "model": self.model, "dtype": self.dtype}


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a split as the manifest lists it."""

    path: Path
    samples: int
    sha256: str | None

    @property
    def file(self) -> str:
        return self.path.name


def stream_names(task: str) -> tuple[str, str]:
    """(cond name, target name) for a task: which encoder conditions and which is generated."""
    return {"eva_to_clip": ("eva_clip", "clip"), "clip_to_eva": ("clip", "eva_clip")}.get(task, ("cond", "target"))


def build_manifest(task: str, grid: tuple[int, int], cond: StreamSpec, target: StreamSpec | None,
                   text: TextSpec | None, splits: dict[str, list[dict]], head: bool,
                   created_by: dict | None = None) -> dict:
    """The manifest dict for the given streams and per-split shard records [{file, samples, sha256}]."""
    return {
        "format_version": FORMAT_VERSION,
        "task": task,
        "grid": [int(grid[0]), int(grid[1])],
        "streams": {"cond": cond.to_dict(), "target": target.to_dict() if target is not None else None},
        "text": text.to_dict() if text is not None else None,
        "head": HEAD_FILE if head else None,
        "splits": {name: {"samples": sum(s["samples"] for s in shards), "shards": list(shards)}
                   for name, shards in splits.items()},
        "created_by": created_by or {},
    }


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Writes manifest.json atomically (a reader never sees a half-written file)."""
    path = Path(folder) / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    return path


def _fail(path: Path, what: str) -> None:
    raise DataError(f"{path}: {what}; rewrite it with `blip3o-fast data ...` or fix the file")


def _int(value: Any, path: Path, key: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(path, f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _stream(raw: Any, grid: tuple[int, int], path: Path, which: str) -> StreamSpec:
    if not isinstance(raw, dict):
        _fail(path, f"streams.{which} must be a mapping")
    for key in ("dim", "tokens"):
        if key not in raw:
            _fail(path, f"streams.{which} has no {key!r}")
    dim = _int(raw["dim"], path, f"streams.{which}.dim")
    tokens = _int(raw["tokens"], path, f"streams.{which}.tokens")
    cls = bool(raw.get("cls", tokens == grid[0] * grid[1] + 1))
    if tokens != grid[0] * grid[1] + int(cls):
        _fail(path, f"streams.{which} has {tokens} tokens but grid {list(grid)} with cls={cls} "
                    f"needs {grid[0] * grid[1] + int(cls)}")
    dtype = raw.get("dtype", "float16")
    if dtype not in DTYPES:
        _fail(path, f"streams.{which}.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    storage = raw.get("storage", "float")  # manifests from before int8 storage hold floats
    if storage not in STORAGES:
        _fail(path, f"streams.{which}.storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    scale = raw.get("scale", "channel")
    if scale not in SCALES:
        _fail(path, f"streams.{which}.scale must be one of {', '.join(SCALES)}, got {scale!r}")
    return StreamSpec(str(raw.get("name", which)), str(raw.get("model", "")), dim, tokens, cls, dtype, storage,
                      scale)


def parse_manifest(manifest: Any, path: Path) -> tuple[StreamSpec, StreamSpec | None, TextSpec | None, tuple[int, int]]:
    """Validates a manifest dict; returns (cond, target, text, grid); target is None for conditions only."""
    if not isinstance(manifest, dict):
        _fail(path, "is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        _fail(path, f"has format_version {version!r}; this blip3o-fast reads version {FORMAT_VERSION}")
    for key in ("task", "grid", "streams", "splits"):
        if key not in manifest:
            _fail(path, f"has no {key!r}")
    grid = manifest["grid"]
    if not (isinstance(grid, list) and len(grid) == 2):
        _fail(path, f"grid must be [gh, gw], got {grid!r}")
    grid = (_int(grid[0], path, "grid[0]"), _int(grid[1], path, "grid[1]"))
    streams = manifest["streams"]
    if not isinstance(streams, dict) or set(streams) != {"cond", "target"}:
        _fail(path, "streams must have exactly 'cond' and 'target'")
    cond = _stream(streams["cond"], grid, path, "cond")
    # target null: conditions only, something to generate from (not to train or evaluate on)
    target = None if streams["target"] is None else _stream(streams["target"], grid, path, "target")
    text = None
    if manifest.get("text") is not None:
        raw = manifest["text"]
        if not isinstance(raw, dict) or "dim" not in raw:
            _fail(path, "text must be a mapping with 'dim'")
        per = raw.get("captions_per_sample")
        if per is not None:
            per = _int(per, path, "text.captions_per_sample")
        most = _int(raw.get("max_captions", per if per is not None else 0), path, "text.max_captions")
        text = TextSpec(_int(raw["dim"], path, "text.dim"), most, per, str(raw.get("model", "")),
                        raw.get("dtype", "float16"))
        if text.dtype not in DTYPES:
            _fail(path, f"text.dtype must be one of {', '.join(DTYPES)}, got {text.dtype!r}")
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        _fail(path, "splits must be a mapping of split name to {samples, shards}")
    for name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            _fail(path, f"splits.{name} must have a list of shards")
        total = 0
        for shard in split["shards"]:
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
                _fail(path, f"splits.{name}.shards entries must be {{file, samples, sha256}}")
            if "/" in shard["file"] or shard["file"].startswith(".."):
                _fail(path, f"shard file {shard['file']!r} must be a plain file name inside the dataset folder")
            total += _int(shard.get("samples"), path, f"samples of {shard['file']}", 0)
        if split.get("samples", total) != total:
            _fail(path, f"splits.{name}.samples is {split.get('samples')} but its shards hold {total}")
    return cond, target, text, grid


class Dataset:
    """A dataset folder: its manifest, stream shapes, splits and shard paths."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.cond, self.target, self.text, self.grid = parse_manifest(manifest, path / MANIFEST)
        self.task: str = str(manifest["task"])
        # where int8 streams become floats: "reader" (on the CPU, batches hold floats) or "device" (batches hold
        # int8 values and `<name>_scale`; quant.to_device dequantises them after the host-to-device copy)
        self.dequantize = "reader"

    def __repr__(self) -> str:
        splits = ", ".join(f"{n}={self.split_samples(n)}" for n in self.split_names())
        return (f"Dataset({str(self.path)!r}, task={self.task}, cond={self.cond_tokens}x{self.cond_dim}, "
                f"target={self.target_tokens}x{self.target_dim}, text={self.text_dim}, {splits})")

    cond_dim = property(lambda self: self.cond.dim)
    target_dim = property(lambda self: self.target.dim if self.target is not None else None)
    cond_tokens = property(lambda self: self.cond.tokens)
    target_tokens = property(lambda self: self.target.tokens if self.target is not None else None)
    cond_cls = property(lambda self: self.cond.cls)
    target_cls = property(lambda self: self.target.cls if self.target is not None else None)
    has_targets = property(lambda self: self.target is not None)
    text_dim = property(lambda self: self.text.dim if self.text is not None else None)
    max_captions = property(lambda self: self.text.max_captions if self.text is not None else 0)

    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def _split(self, name: str) -> dict:
        splits = self.manifest["splits"]
        if name not in splits:
            raise DataError(f"dataset {self.path} has no split {name!r} (it has: {', '.join(splits) or 'none'}); "
                            f"set data.train_split / data.eval_split to one of them")
        return splits[name]

    def split_samples(self, name: str) -> int:
        """Number of samples the manifest lists for a split."""
        return sum(s["samples"] for s in self._split(name)["shards"])

    def shards(self, name: str) -> list[ShardInfo]:
        """The split's shards, in manifest order."""
        return [ShardInfo(self.path / s["file"], int(s["samples"]), s.get("sha256"))
                for s in self._split(name)["shards"]]

    @property
    def head_path(self) -> Path | None:
        """head.safetensors of the target encoder, when the dataset has one."""
        name = self.manifest.get("head")
        path = self.path / (name or HEAD_FILE)
        return path if path.is_file() else None


def open_dataset(path: str | Path) -> Dataset:
    """Opens a dataset folder; UserError when the folder or its manifest is missing or malformed."""
    folder = Path(path).expanduser()
    if folder.is_file() and folder.name == MANIFEST:
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist: run `blip3o-fast data synth --out {folder}` "
                        f"or point data.path at a folder holding {MANIFEST}")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{folder} has no {MANIFEST}: point data.path at a dataset folder "
                        f"(written by `blip3o-fast data synth|convert-chunks` or `blip3o-fast extract`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{manifest_path} is not valid JSON ({e}); rewrite the dataset") from None
    return Dataset(folder, manifest)


def check_compatible(dataset: Dataset, task) -> None:
    """One-line UserError unless the dataset's streams fit a TaskConfig (dims, grid, CLS, task name)."""
    where = f"point data.path at a dataset made for it (now {dataset.path})"
    checks = [
        ("cond_dim", task.cond_dim, dataset.cond_dim, "cond stream has dim"),
        ("target_dim", task.target_dim, dataset.target_dim, "target stream has dim"),
        ("grid", list(task.grid), list(dataset.grid), "grid is"),
        ("cond_cls", task.cond_cls, dataset.cond_cls, "cond stream has cls"),
        ("target_cls", task.target_cls, dataset.target_cls, "target stream has cls"),
    ]
    for key, want, have, what in checks:
        if have is None and key.startswith("target"):  # conditions only: nothing to compare
            continue
        if want != have:
            value = str(have).lower() if isinstance(have, bool) else have
            raise DataError(f"task.{key}={_show(want)} but the dataset's {what} {_show(have)}: "
                            f"set task.{key}={_show(value)} or {where}")
    if dataset.task in TASKS and dataset.task != task.name:
        raise DataError(f"task.name={task.name} but the dataset was made for {dataset.task}: "
                        f"set task.name={dataset.task} or {where}")


def check_same_storage(folder: Path, was: tuple, new: tuple) -> None:
    """A dataset folder has one storage per stream: adding shards of another would make them unreadable as
    the manifest says. `was`, `new`: the (cond, target) StreamSpecs (target may be None)."""
    was, new = ([(s.storage, s.scale) for s in specs if s is not None] for specs in (was, new))
    if new != was:
        raise DataError(f"{folder} holds a dataset stored as {was} (storage, scale of cond, target), not {new}: "
                        f"pass the same --storage and --int8-scale or write to another --out")


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def grid_of(tokens: int, cls: bool) -> tuple[int, int]:
    """The square patch grid of `tokens` (less one when CLS), or a DataError when it is not square."""
    n = tokens - int(cls)
    side = math.isqrt(max(n, 0))
    if n <= 0 or side * side != n:
        raise DataError(f"{tokens} tokens ({'with' if cls else 'without'} CLS) is not a square patch grid; "
                        f"pass the grid explicitly")
    return side, side
