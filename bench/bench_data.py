"""The data pipeline at the real shapes (cond [256, 4096] + target [256, 1024] float16, 2.6 MB a sample):
decoded, validated samples per second and MB/s from shards with 0, 1 and 2 DataLoader workers, beside a
raw read of the same tar files (`tarfile` + read of every member, no decoding) as the ceiling; each with the
condition stored as float16 and as int8 (docs/architecture.md §3.9.6), side by side: `[float16-...]` and
`[int8-...]`, and the int8 reader both dequantising on the CPU (`cpu`) and passing int8 + scale on for the
GPU to dequantise (`device`). The quantisation error of int8 at the real shapes, on `data synth --preset real
--outlier-channels 8` features (CLIP-like outlier channels), per-token and per-channel scales.

    pytest bench/bench_data.py --benchmark-columns=mean,min,max

The shards are freshly written, so every reader runs from the page cache: this measures the CPU cost of
reading, not the disk. Each result carries `samples_per_s`, `MB_per_s` and `bytes_per_sample` (the shard bytes
over the samples) in its extra_info. Learning with int8 storage: bench/bench_storage.py.
"""

from __future__ import annotations

import io
import itertools
import tarfile

import numpy as np
import pytest

from blip3o_fast.data import EvalLoader, StreamSpec, TrainLoader, open_dataset
from blip3o_fast.data.quant import dequantize_array, quantize
from blip3o_fast.data.synth import PRESETS, SynthSpec, SynthWorld
from blip3o_fast.data.writer import ShardSetWriter, save_manifest

SHARDS, PER_SHARD, BATCH = 2, 48, 16
COND = StreamSpec("eva_clip", "bench", 4096, 256, False)
TARGET = StreamSpec("clip", "bench", 1024, 256, False)
# (condition storage, where int8 is dequantised)
STORAGES = {"float16": ("float", "reader"), "int8-cpu": ("int8", "reader"), "int8-device": ("int8", "device")}


@pytest.fixture(scope="module", params=list(STORAGES))
def shards(request, tmp_path_factory):
    storage, where = STORAGES[request.param]
    folder = tmp_path_factory.mktemp(f"bench_data_{request.param}")
    cond_spec = StreamSpec(COND.name, COND.model, COND.dim, COND.tokens, COND.cls, storage=storage)
    rng = np.random.default_rng(0)
    cond = rng.standard_normal((256, 4096)).astype(np.float16)
    target = rng.standard_normal((256, 1024)).astype(np.float16)
    with ShardSetWriter(folder, "train", cond_spec, TARGET, None, shard_size=PER_SHARD) as w:
        for i in range(SHARDS * PER_SHARD):
            w.write(f"s{i:06d}", cond, target)
    save_manifest(folder, "eva_to_clip", (16, 16), cond_spec, TARGET, None, {"train": w.records})
    ds = open_dataset(folder)
    ds.dequantize = where
    return ds, sum(s.path.stat().st_size for s in ds.shards("train"))


def _report(benchmark, samples: int, nbytes: int, per_sample: int | None = None) -> None:
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["samples_per_s"] = round(samples / mean, 1)
    benchmark.extra_info["MB_per_s"] = round(nbytes / mean / 1e6, 1)
    benchmark.extra_info["bytes_per_sample"] = per_sample or round(nbytes / samples)


def test_raw_tar_read(benchmark, shards):
    ds, nbytes = shards

    def read():
        n = 0
        for shard in ds.shards("train"):
            with tarfile.open(shard.path, "r:") as tf:
                for member in tf:
                    if member.isreg():
                        n += len(tf.extractfile(member).read())
        return n

    assert benchmark.pedantic(read, rounds=5, warmup_rounds=1) > 0.99 * nbytes
    _report(benchmark, SHARDS * PER_SHARD, nbytes)


def test_raw_tar_read_into_batches(benchmark, shards):
    """The conventional path without any checks: read every member, stack each 16 into a fresh batch array
    (what webdataset + default_collate do): the ceiling for a reader whose batches are new memory."""
    ds, nbytes = shards

    def read():
        n, arrays = 0, {"cond.npy": [], "target.npy": []}
        for shard in ds.shards("train"):
            with tarfile.open(shard.path, "r:") as tf:
                for member in tf:
                    ext = member.name.split(".", 1)[1]
                    if ext in arrays:
                        arrays[ext].append(np.load(io.BytesIO(tf.extractfile(member).read())))
                    if len(arrays["target.npy"]) == BATCH:
                        batch = {k: np.stack(v) for k, v in arrays.items()}
                        n += len(batch["cond.npy"])
                        arrays = {k: [] for k in arrays}
        return n

    assert benchmark.pedantic(read, rounds=5, warmup_rounds=1) == SHARDS * PER_SHARD
    _report(benchmark, SHARDS * PER_SHARD, nbytes)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_eval_reader(benchmark, shards, workers):
    ds, nbytes = shards
    loader = EvalLoader(ds, "train", BATCH, num_workers=workers, pin_memory=False)

    def read():
        return sum(len(b["key"]) for b in loader)

    assert benchmark.pedantic(read, rounds=5, warmup_rounds=1) == SHARDS * PER_SHARD
    _report(benchmark, SHARDS * PER_SHARD, nbytes)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_reader_steady_state(benchmark, shards, workers):
    ds, nbytes = shards
    it = iter(TrainLoader(ds, "train", BATCH, seed=0, num_workers=workers, shuffle_buffer=PER_SHARD,
                           pin_memory=False))
    batches = SHARDS * PER_SHARD // BATCH
    next(it)  # workers started, prefetch queues filled

    def read():
        return sum(len(b["key"]) for b in itertools.islice(it, batches))

    assert benchmark.pedantic(read, rounds=5, warmup_rounds=1) == batches * BATCH
    _report(benchmark, batches * BATCH, nbytes * batches * BATCH // (SHARDS * PER_SHARD),
            round(nbytes / (SHARDS * PER_SHARD)))


@pytest.mark.parametrize("outliers", [0, 8])
@pytest.mark.parametrize("per", ["token", "channel"])
def test_int8_quantisation_error(benchmark, per, outliers):
    """The writer's quantisation of one real-shape condition (timed), and its error against the float16 features
    on synthetic features without and with 8 CLIP-like outlier channels: relative error (||x - x'|| / ||x||, over every
    sample) and the cosine of each token to its float16 original (mean and worst)."""
    spec = SynthSpec(**PRESETS["real"], train_samples=8, outlier_channels=outliers)
    cond = SynthWorld(spec).chunk("train", 0, 8)["cond"].astype(np.float16)
    q, scale = benchmark.pedantic(quantize, args=(cond[0], per), rounds=10, warmup_rounds=1)
    x = cond.astype(np.float64)
    back = np.stack([dequantize_array(*quantize(c, per), np.dtype(np.float16)) for c in cond]).astype(np.float64)
    cos = (x * back).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(back, axis=-1))
    normal = np.setdiff1d(np.arange(x.shape[-1]), SynthWorld(spec).outliers["cond"][0])  # the other channels
    benchmark.extra_info.update(
        relative_error=float(np.linalg.norm(back - x) / np.linalg.norm(x)),
        relative_error_normal_channels=float(np.linalg.norm((back - x)[..., normal]) / np.linalg.norm(x[..., normal])),
        token_cosine_mean=float(cos.mean()), token_cosine_min=float(cos.min()),
        bytes_float16=cond[0].nbytes, bytes_int8=q.nbytes + scale.nbytes)
    assert cos.min() > 0.99
