"""The data pipeline at the real shapes (cond [256, 4096] + target [256, 1024] float16, 2.6 MB a sample):
decoded, validated samples per second and MB/s from shards with 0, 1 and 2 DataLoader workers, beside a
raw read of the same tar files (`tarfile` + read of every member, no decoding) as the ceiling.

    pytest bench/bench_data.py --benchmark-columns=mean,min,max

The shards are freshly written, so every reader runs from the page cache: this measures the CPU cost of
reading, not the disk. Each result carries `samples_per_s` and `MB_per_s` in its extra_info.
"""

from __future__ import annotations

import io
import itertools
import tarfile

import numpy as np
import pytest

from blip3o_fast.data import EvalLoader, StreamSpec, TrainLoader, open_dataset
from blip3o_fast.data.writer import ShardSetWriter, save_manifest

SHARDS, PER_SHARD, BATCH = 2, 48, 16
COND = StreamSpec("eva_clip", "bench", 4096, 256, False)
TARGET = StreamSpec("clip", "bench", 1024, 256, False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_data")
    rng = np.random.default_rng(0)
    cond = rng.standard_normal((256, 4096)).astype(np.float16)
    target = rng.standard_normal((256, 1024)).astype(np.float16)
    with ShardSetWriter(folder, "train", COND, TARGET, None, shard_size=PER_SHARD) as w:
        for i in range(SHARDS * PER_SHARD):
            w.write(f"s{i:06d}", cond, target)
    save_manifest(folder, "eva_to_clip", (16, 16), COND, TARGET, None, {"train": w.records})
    ds = open_dataset(folder)
    return ds, sum(s.path.stat().st_size for s in ds.shards("train"))


def _report(benchmark, samples: int, nbytes: int) -> None:
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["samples_per_s"] = round(samples / mean, 1)
    benchmark.extra_info["MB_per_s"] = round(nbytes / mean / 1e6, 1)


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
    _report(benchmark, batches * BATCH, nbytes * batches * BATCH // (SHARDS * PER_SHARD))
