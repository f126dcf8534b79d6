"""Start-up at scale: a manifest of 60,000 shards (30M samples) opens and the first batch is read within 60 s.

    .venv/bin/python bench/bench_startup.py [--shards 60000] [--per-shard 500] [--workers 0 2]

Three real shards (written with `ShardSetWriter`, demo shapes) are linked under 60,000 distinct names (symlinks),
and the manifest lists each with `--per-shard` samples, so every path is a different file to the reader (its
index cache is keyed by path) while the disk holds three. Each stage is timed on its own, wall clock:
`open_dataset` (JSON parse and validation), `TrainLoader(...)` and its first batch, `EvalLoader` and its
first batch. The samples counts are the manifest's: a shard's tar index is built only when the shard is read.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from blip3o_fast.data import EvalLoader, StreamSpec, TrainLoader, open_dataset
from blip3o_fast.data.writer import ShardSetWriter, save_manifest

COND = StreamSpec("eva_clip", "bench", 64, 64, False)
TARGET = StreamSpec("clip", "bench", 32, 65, True)


def build(folder: Path, shards: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    with ShardSetWriter(folder, "real", COND, TARGET, None, shard_size=per_shard) as w:
        for i in range(3 * per_shard):
            w.write(f"s{i:08d}", rng.standard_normal((64, 64)), rng.standard_normal((65, 32)))
    real = [r["file"] for r in w.records]
    records = []
    for i in range(shards):
        name = f"train-{i:06d}.tar"
        (folder / name).symlink_to(real[i % len(real)])
        records.append({"file": name, "samples": per_shard, "sha256": w.records[i % len(real)]["sha256"]})
    save_manifest(folder, "eva_to_clip", (8, 8), COND, TARGET, None, {"train": records, "eval": records[:100]})


def timed(label: str, fn, results: dict):
    t0 = time.perf_counter()
    out = fn()
    results[label] = round(time.perf_counter() - t0, 3)
    print(f"{label:40s} {results[label]:8.3f} s", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=60000)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    args = p.parse_args()
    results: dict = {"shards": args.shards, "samples": args.shards * args.per_shard}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        timed("build (3 real shards + symlinks)", lambda: build(folder, args.shards, args.per_shard), results)
        print(f"manifest.json: {(folder / 'manifest.json').stat().st_size / 1e6:.1f} MB", flush=True)
        total = time.perf_counter()
        ds = timed("open_dataset", lambda: open_dataset(folder), results)
        for workers in args.workers:
            loader = timed(f"TrainLoader(num_workers={workers})",
                           lambda w=workers: TrainLoader(ds, "train", 32, 0, num_workers=w), results)
            it = iter(loader)
            timed(f"  first batch (num_workers={workers})", lambda it=it: next(it), results)
            del it, loader
        timed("EvalLoader + first batch", lambda: next(iter(EvalLoader(ds, "train", 32))), results)
        results["open_plus_first_batch_s"] = round(results["open_dataset"] + results["TrainLoader(num_workers=0)"]
                                                   + results["  first batch (num_workers=0)"], 3)
        results["all_stages_s"] = round(time.perf_counter() - total, 3)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
