"""Writing datasets: webdataset's `ShardWriter` per split, sha256 and sample counts per shard, the manifest.

Shards are written under a `.partial` name, hashed as they are written, and renamed when complete,
so a crash never leaves a shard that looks finished. Samples are checked before they are written
(shape, finite after the cast to float16); one that fails is skipped and counted, not written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import webdataset as wds

from ..runtime.files import commit, partial_path
from .format import (
    COND,
    HEAD_FILE,
    MANIFEST,
    META,
    STATS_FILE,
    TARGET,
    TEXT,
    DataError,
    StreamSpec,
    TextSpec,
    build_manifest,
    check_same_storage,
    parse_manifest,
    scale_member,
    write_manifest,
)
from .quant import dequantize_array, quantize
from .samples import SkipStats
from .stats import ChannelStats, DatasetStats, save_stats
from .tario import all_finite

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def safe_key(key: str) -> str:
    """A sample key webdataset groups correctly: no dots (they start the extension) and no slashes."""
    return _UNSAFE.sub("_", str(key)) or "_"


class _HashingFile:
    """A write-only file that hashes what passes through it."""

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ShardSetWriter:
    """Writes samples into `<prefix>-000000.tar`, ... of at most `shard_size` samples (and `max_bytes`)."""

    def __init__(self, folder: str | Path, prefix: str, cond: StreamSpec, target: StreamSpec | None,
                 text: TextSpec | None = None, shard_size: int = 500, max_bytes: float = 3e9):
        if shard_size < 1:
            raise DataError(f"shard size must be >= 1, got {shard_size}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cond, self.target, self.text = cond, target, text
        self.records: list[dict] = []
        self.stats = SkipStats()
        # per-channel statistics of what is written (the float16 values), for stats.safetensors
        self.channels = (ChannelStats(cond.dim), ChannelStats(target.dim) if target is not None else None)
        self._file: _HashingFile | None = None
        # mtime=0 makes shards byte-reproducible, so a rerun of a deterministic producer has the same sha256
        self._writer = wds.ShardWriter(str(self.folder / f"{prefix}-%06d.tar"), maxcount=shard_size,
                                       maxsize=max_bytes, post=self._finished, opener=self._open, verbose=0,
                                       mtime=0.0)

    def _open(self, fname: str) -> _HashingFile:
        self._file = _HashingFile(str(partial_path(fname)))
        return self._file

    def _finished(self, fname: str) -> None:
        f, count = self._file, self._writer.count
        f.close()
        if count == 0:
            os.remove(f.path)
            return
        commit(f.path, fname)
        self.records.append({"file": Path(fname).name, "samples": count, "sha256": f.sha.hexdigest()})

    def _check(self, name: str, x, spec_rows: int | None, dim: int, max_rows: int | None = None) -> np.ndarray:
        x = np.asarray(x)
        rows_ok = x.ndim == 2 and (x.shape[0] == spec_rows if max_rows is None else x.shape[0] <= max_rows)
        if not rows_ok or x.shape[1] != dim:
            want = [spec_rows, dim] if max_rows is None else f"[<= {max_rows}, {dim}]"
            raise ValueError(f"bad shape: {name} {list(x.shape)} instead of {want}")
        with np.errstate(over="ignore"):  # overflow to inf is reported just below, per sample
            x = np.ascontiguousarray(x, dtype=np.float16)
        if not all_finite(x):
            raise ValueError(f"non-finite: {name} (after the cast to float16)")
        return x

    def _store(self, sample: dict, ext: str, x: np.ndarray, spec: StreamSpec) -> np.ndarray:
        """Puts the checked float16 `x` into the sample as the stream stores it; returns what a reader gets back."""
        if not spec.int8:
            sample[ext] = x
            return x
        q, scale = quantize(x, spec.scale)
        back = dequantize_array(q, scale, np.dtype(spec.dtype))
        if not all_finite(back):  # a token at the edge of float16's range can round past it
            raise ValueError(f"non-finite: {ext} (after int8 quantisation)")
        sample[ext], sample[scale_member(ext)] = q, scale
        return back

    def write(self, key: str, cond, target, text=None, captions=(), source=None) -> bool:
        """Writes one sample (cast to float16, then quantised for an int8 stream); False (and counted) when it
        fails the checks. Without a target stream (conditions only) `target` must be None."""
        try:
            sample = {"__key__": safe_key(key)}
            read = [self._store(sample, COND, self._check("cond", cond, self.cond.tokens, self.cond.dim), self.cond)]
            if self.target is not None:
                read.append(self._store(sample, TARGET, self._check("target", target, self.target.tokens,
                                                                    self.target.dim), self.target))
            elif target is not None:
                raise ValueError("bad sample: a target for a conditions-only dataset")
            if self.text is not None:
                sample[TEXT] = self._check("text", np.zeros((0, self.text.dim)) if text is None else text,
                                           None, self.text.dim, self.text.max_captions)
            sample[META] = {"key": str(key), "captions": [str(c) for c in captions], "source": source}
        except ValueError as e:
            reason, _, detail = str(e).partition(": ")
            self.stats.skip_sample(reason, f"{key} ({detail})")
            return False
        self._writer.write(sample)
        self.stats.samples += 1
        for channels, values in zip(self.channels, read):  # the values as read back (dequantised when int8)
            channels.add(values)
        return True

    def write_stored(self, key: str, members: dict[str, bytes], values: list) -> None:
        """Writes one sample whose members are already encoded as this writer's streams store them (`data subset`
        copies a source's checked bytes unchanged); `values`: its cond (and target) tokens as a reader gets them
        back, for the statistics."""
        self._writer.write({"__key__": safe_key(key), **members})
        self.stats.samples += 1
        for channels, rows in zip(self.channels, values):
            if channels is not None:
                channels.add(rows)

    def close(self) -> list[dict]:
        """Finishes the last shard; returns the records [{file, samples, sha256}] in order."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.records

    def channel_stats(self, split: str = "train") -> DatasetStats:
        """The per-channel statistics of every sample written so far."""
        return DatasetStats.from_accumulators(*self.channels, self.stats.samples, split)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def prepare_output(folder: str | Path, overwrite: bool) -> Path:
    """Creates the output folder; refuses one that holds a dataset unless `overwrite` (then removes it)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.exists():
        if not overwrite:
            raise DataError(f"{folder} already holds a dataset ({MANIFEST}): pass --overwrite or choose another --out")
        try:
            old = json.loads(manifest.read_text())
            files = [s["file"] for split in old.get("splits", {}).values() for s in split.get("shards", [])]
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
            files = []
        for name in files + [HEAD_FILE, STATS_FILE, MANIFEST]:
            if "/" not in name:
                (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_manifest(folder: str | Path, task: str, grid, cond: StreamSpec, target: StreamSpec | None,
                  text: TextSpec | None,
                  splits: dict[str, list[dict]], created_by: dict | None = None, merge: bool = False,
                  stats: DatasetStats | None = None) -> dict:
    """Writes manifest.json (and `stats` as stats.safetensors, named in it); with merge=True, keeps the other
    splits of an existing one with the same streams."""
    folder = Path(folder)
    head = (folder / HEAD_FILE).is_file()
    manifest = build_manifest(task, grid, cond, target, text, splits, head, created_by)
    if stats is not None:
        save_stats(folder, stats)
    if (folder / STATS_FILE).is_file():
        manifest["stats"] = STATS_FILE
    path = folder / MANIFEST
    if merge and path.is_file():
        old = json.loads(path.read_text())
        o_cond, o_target, o_text, o_grid = parse_manifest(old, path)
        new = (cond.dim, cond.tokens, target and (target.dim, target.tokens), text.dim if text else None, tuple(grid))
        was = (o_cond.dim, o_cond.tokens, o_target and (o_target.dim, o_target.tokens), o_text.dim if o_text else None,
               o_grid)
        if new != was:
            raise DataError(f"{folder} holds a dataset of other shapes (cond, target, text, grid {was} vs {new}): "
                            f"write to another --out")
        check_same_storage(folder, (o_cond, o_target), (cond, target))
        for name, split in old["splits"].items():
            manifest["splits"].setdefault(name, split)
    write_manifest(folder, manifest)
    return manifest
