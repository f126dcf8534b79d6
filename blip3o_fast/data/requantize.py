"""`data convert`: an existing dataset rewritten with another storage (float16 <-> int8, docs/architecture.md §3.9.6).

Every split is read as a trainer reads it (validated, dequantised) and written again with the same keys,
captions and caption embeddings, split by split, in manifest order, with shards of the source's largest shard
size; a bad source sample is skipped and counted, never written. The head is copied and the statistics are
recomputed from what was written (int8 values read back). The source folder is only read.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from .format import HEAD_FILE, DataError, open_dataset
from .reader import EvalLoader
from .writer import ShardSetWriter, prepare_output, save_manifest


def convert_dataset(src: str | Path, out: str | Path, storage: str = "int8", storage_target: str = "float",
                    int8_scale: str = "channel", overwrite: bool = False, progress: bool = True) -> dict:
    """Writes `src` to `out` with the given storage of each stream; returns {split: {samples, shards, skipped}}."""
    from tqdm import tqdm

    source = open_dataset(src)
    out = Path(out).expanduser()
    if out.resolve() == source.path.resolve():
        raise DataError(f"--out {out} is the source dataset, which convert never modifies: choose another --out")
    folder = prepare_output(out, overwrite)
    cond = replace(source.cond, dtype="float16", storage=storage, scale=int8_scale)
    target = (replace(source.target, dtype="float16", storage=storage_target, scale=int8_scale)
              if source.target is not None else None)
    text = replace(source.text, dtype="float16") if source.text is not None else None
    if source.head_path is not None:
        shutil.copyfile(source.head_path, folder / HEAD_FILE)
    records, summary, stats = {}, {}, None
    bar = tqdm(total=sum(source.split_samples(n) for n in source.split_names()), unit="sample", desc="data convert",
               disable=not progress)
    for split in source.split_names():
        shards = source.shards(split)
        with ShardSetWriter(folder, split, cond, target, text,
                            shard_size=max([s.samples for s in shards] + [1])) as writer:
            loader = EvalLoader(source, split, 32, pin_memory=False) if source.split_samples(split) else []
            for batch in loader:
                for j, key in enumerate(batch["key"]):
                    writer.write(key, batch["cond"][j].numpy(),
                                 batch["target"][j].numpy() if target is not None else None,
                                 batch["text"][j][batch["text_mask"][j]].numpy() if text is not None else None,
                                 batch["captions"][j], {"converted_from": str(source.path), "split": split})
                bar.update(len(batch["key"]))
        records[split] = writer.records
        skipped = loader.stats()["skipped_samples"] if loader else 0
        summary[split] = {"samples": writer.stats.samples, "shards": len(writer.records),
                          "skipped": skipped + writer.stats.skipped_samples}
        if split == "train":  # the statistics of the train split, as it now reads
            stats = writer.channel_stats(split)
    bar.close()
    save_manifest(folder, source.task, source.grid, cond, target, text, records, stats=stats,
                  created_by={"command": "blip3o-fast data convert", "source": str(source.path),
                              "storage": {"cond": storage, "target": storage_target, "scale": int8_scale},
                              "source_created_by": source.manifest.get("created_by", {})})
    return summary
