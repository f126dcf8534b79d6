"""`data subset`: the first N samples of one split of a dataset, as the `train` split of a new dataset (the overfit
mode's data, docs/architecture.md §3.9.7).

The samples are the first N that `EvalLoader` reads (manifest order, tar order inside a shard, a bad sample skipped
and counted), checked as a reader checks them, then copied member by member: the bytes of every `.npy` member and
of the `.json` are the source's, so the storage (float16, float32 or int8 with its scales), keys, captions and
caption embeddings are unchanged. The head is copied and `stats.safetensors` is computed for the subset (the values
as read back). The source folder is only read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .format import HEAD_FILE, META, DataError, open_dataset
from .samples import BatchBuilder, SkipStats
from .tario import NpyError, index_shard
from .writer import ShardSetWriter, prepare_output, save_manifest


def _check(source, split: str, samples: int, out: Path, overwrite: bool) -> None:
    """One-line errors for what the command cannot do, before anything is written."""
    names = source.split_names()
    if split not in names:
        raise DataError(f"dataset {source.path} has no split {split!r} (it has: {', '.join(names) or 'none'}): "
                        f"pass --split one of them")
    if samples < 1:
        raise DataError(f"--samples must be >= 1, got {samples}")
    have = source.split_samples(split)
    if samples > have:
        raise DataError(f"--samples {samples} but split {split!r} of {source.path} has {have} samples: "
                        f"pass --samples {have} or fewer")
    if not source.has_targets:
        raise DataError(f"{source.path} holds conditions only (streams.target is null): a subset to train on "
                        f"needs a dataset with targets")
    if out.resolve() == source.path.resolve():
        raise DataError(f"--out {out} is the source dataset, which subset never modifies: choose another --out")
    if out.is_file():
        raise DataError(f"--out {out} is a file: choose a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"--out {out} already exists and is not empty: pass --overwrite or choose another --out")


def _first(source, split: str, samples: int, stats: SkipStats):
    """(shard, sample index, batch of one) of the split's first `samples` valid samples, in EvalLoader's order."""
    builder = BatchBuilder(source, 1)
    taken = 0
    for shard in source.shards(split):
        index = index_shard(shard.path)
        found = min(len(index.samples), shard.samples)
        if found < shard.samples:
            stats.skip_shard(index.error or "shard shorter than its manifest", shard.file)
            stats.skip_sample("lost with shard", shard.file, shard.samples - found)
        if not found:
            continue
        with open(shard.path, "rb") as f:
            for sample in index.samples[:found]:
                try:
                    builder.add(f, sample)
                except NpyError as e:
                    stats.skip_sample(e.reason, f"{shard.file}:{sample.key}")
                    continue
                except OSError as e:
                    stats.skip_sample("read error", f"{shard.file}:{sample.key} ({e.strerror or e})")
                    continue
                stats.samples += 1
                yield shard, sample, builder.emit()
                taken += 1
                if taken == samples:
                    return


def _members(path: Path, sample, exts: list[str]) -> dict[str, bytes]:
    """The stored bytes of a sample's members `exts` (those it has)."""
    out = {}
    with open(path, "rb") as f:
        for ext in exts:
            if ext in sample.members:
                offset, size = sample.members[ext]
                f.seek(offset)
                out[ext] = f.read(size)
    return out


def subset_dataset(src: str | Path, out: str | Path, samples: int, split: str = "train", overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Writes the first `samples` samples of `split` of `src` as split `train` of `out`; returns
    {samples, shards, skipped, keys}."""
    from tqdm import tqdm

    source = open_dataset(src)
    out = Path(out).expanduser()
    _check(source, split, samples, out, overwrite)
    folder = prepare_output(out, overwrite)
    exts = [*BatchBuilder(source, 1).required, META]
    shards = source.shards(split)
    stats = SkipStats()
    keys = []
    bar = tqdm(total=samples, unit="sample", desc="data subset", disable=not progress)
    with ShardSetWriter(folder, "train", source.cond, source.target, source.text,
                        shard_size=max([s.samples for s in shards] + [1])) as writer:
        for shard, sample, batch in _first(source, split, samples, stats):
            writer.write_stored(sample.key, _members(shard.path, sample, exts),
                                [batch["cond"][0].numpy(), batch["target"][0].numpy()])
            keys.append(sample.key)
            bar.update(1)
    bar.close()
    if len(keys) < samples:  # bad samples in the source: what was written is no dataset, remove it
        for record in writer.records:
            (folder / record["file"]).unlink(missing_ok=True)
        raise DataError(f"split {split!r} of {source.path} has only {len(keys)} valid samples of the {samples} asked "
                        f"({stats.summary()}): pass --samples {len(keys)} or fewer")
    if source.head_path is not None:
        shutil.copyfile(source.head_path, folder / HEAD_FILE)
    save_manifest(folder, source.task, source.grid, source.cond, source.target, source.text,
                  {"train": writer.records}, stats=writer.channel_stats("train"),
                  created_by={"command": "blip3o-fast data subset", "source": str(source.path), "split": split,
                              "samples": samples, "source_created_by": source.manifest.get("created_by", {})})
    return {"samples": len(keys), "shards": len(writer.records), "skipped": stats.skipped_samples, "keys": keys}
