"""`stats.safetensors`: per-channel mean and standard deviation of a dataset's streams (docs/architecture.md §3.9.5).

Written beside the manifest (which names it, as it names the head) from the train split only, so the held-out
split stays held out. The producers accumulate while they write (`ChannelStats`, float64, Chan's parallel
update); `blip3o-fast data stats DATASET` computes them for an existing dataset by reading its train split.
Values are of the tokens as stored (after the cast to float16), every token of every sample, CLS included.

The file holds float64 tensors `cond.mean`, `cond.std` [Dc] and `target.mean`, `target.std` [Dt] (target
omitted for a conditions-only dataset), and metadata {split, samples}. This module is the only one that
reads or writes it; `model/normalize.py` applies the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .format import STATS_FILE, DataError, Dataset, write_manifest


class ChannelStats:
    """Streaming per-channel mean and variance in float64: rows [n, D] arrive in any number of pieces."""

    def __init__(self, dim: int):
        self.dim, self.count = dim, 0
        self.mean = np.zeros(dim, np.float64)
        self.m2 = np.zeros(dim, np.float64)  # sum of squared deviations from the mean

    def add(self, rows) -> None:
        x = np.asarray(rows, dtype=np.float64).reshape(-1, self.dim)
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(0)
        m2 = np.square(x - mean).sum(0)
        total = self.count + n
        delta = mean - self.mean
        # Chan et al.: merging two partial moments is exact, whatever the piece sizes
        self.m2 += m2 + np.square(delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


@dataclass(frozen=True)
class DatasetStats:
    """float64 per-channel mean and std of each stream (target None for conditions only)."""

    cond_mean: torch.Tensor
    cond_std: torch.Tensor
    target_mean: torch.Tensor | None
    target_std: torch.Tensor | None
    samples: int
    split: str = "train"

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"cond.mean": self.cond_mean, "cond.std": self.cond_std}
        if self.target_mean is not None:
            out.update({"target.mean": self.target_mean, "target.std": self.target_std})
        return out

    @classmethod
    def from_accumulators(cls, cond: ChannelStats, target: ChannelStats | None, samples: int,
                          split: str = "train") -> DatasetStats:
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float64))
        return cls(as_t(cond.mean), as_t(cond.std), None if target is None else as_t(target.mean),
                   None if target is None else as_t(target.std), samples, split)


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path / STATS_FILE if path.is_dir() else path


def save_stats(path: str | Path, stats: DatasetStats) -> Path:
    """Writes the statistics (into a dataset or export folder, or to a file)."""
    path = _resolve(path)
    tensors = {k: v.to(torch.float64).contiguous() for k, v in stats.tensors().items()}
    save_file(tensors, str(path), metadata={"split": stats.split, "samples": str(int(stats.samples))})
    return path


def read_stats(path: str | Path, cond_dim: int | None = None, target_dim: int | None = None) -> DatasetStats | None:
    """The statistics of a dataset or export folder (or a file), None when there are none; a DataError when the
    file is damaged, misses a tensor, or does not fit the given dims."""
    path = _resolve(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key).to(torch.float64) for key in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable safetensors file ({e}); rewrite it with "
                        f"`blip3o-fast data stats DATASET`") from None
    for key, dim in (("cond", cond_dim), ("target", target_dim)):
        have = [f"{key}.mean" in tensors, f"{key}.std" in tensors]
        if (key == "cond" or any(have)) and not all(have):
            raise DataError(f"{path} lacks {key}.mean or {key}.std; rewrite it with `blip3o-fast data stats DATASET`")
        if all(have):
            mean, std = tensors[f"{key}.mean"], tensors[f"{key}.std"]
            bad = mean.dim() != 1 or std.shape != mean.shape or (dim is not None and mean.shape[0] != dim)
            if bad or not bool(torch.isfinite(mean).all() and torch.isfinite(std).all() and (std >= 0).all()):
                raise DataError(f"{path}: {key} statistics of shape {list(mean.shape)} (std {list(std.shape)}) are "
                                f"not finite per-channel vectors of dim {dim}; rewrite them with "
                                f"`blip3o-fast data stats DATASET`")
    target = "target.mean" in tensors
    return DatasetStats(tensors["cond.mean"], tensors["cond.std"], tensors["target.mean"] if target else None,
                        tensors["target.std"] if target else None, int(meta.get("samples", 0)),
                        meta.get("split", "train"))


def record_stats(folder: Path, manifest: dict) -> None:
    """Names the statistics file in the manifest (rewritten atomically)."""
    manifest["stats"] = STATS_FILE
    write_manifest(folder, manifest)


def compute_stats(dataset: Dataset, split: str = "train", batch_size: int = 64, progress: bool = True) -> DatasetStats:
    """Reads every valid sample of `split` once and accumulates its statistics (corrupt samples are skipped)."""
    from tqdm import tqdm

    from .reader import EvalLoader

    cond = ChannelStats(dataset.cond_dim)
    target = ChannelStats(dataset.target_dim) if dataset.has_targets else None
    samples = 0
    bar = tqdm(total=dataset.split_samples(split), unit="sample", desc="data stats", disable=not progress)
    for batch in EvalLoader(dataset, split, batch_size, num_workers=0):
        cond.add(batch["cond"].numpy())
        if target is not None:
            target.add(batch["target"].numpy())
        samples += len(batch["key"])
        bar.update(len(batch["key"]))
    bar.close()
    if samples == 0:
        raise DataError(f"{dataset.path}: split {split!r} has no valid samples to compute statistics from")
    return DatasetStats.from_accumulators(cond, target, samples, split)


def write_dataset_stats(dataset: Dataset, split: str = "train", progress: bool = True) -> DatasetStats:
    """`blip3o-fast data stats`: computes the split's statistics, writes stats.safetensors, names it in the manifest."""
    stats = compute_stats(dataset, split, progress=progress)
    save_stats(dataset.path, stats)
    record_stats(dataset.path, dataset.manifest)
    return stats

