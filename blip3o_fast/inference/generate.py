"""`blip3o-fast generate`: a model's target tokens for every sample of a dataset split, written as a dataset
(docs/architecture.md §3.13).

Input shard i becomes output shard `<split>-<i:06d>-000000.tar` with the same sample keys, the source's
condition, captions and text embeddings, and the generated tokens as `target.npy`. Each sample's noise is
seeded by (seed, its key), so under torchrun (rank r takes input shards r, r + world, ...) the output is
byte-identical to one process. A record per finished input shard in `.generate/` makes a rerun after a kill
resume where it stopped; rank 0 writes the manifest once every rank is done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

from tqdm import tqdm

from ..data import Dataset, EvalLoader, open_dataset, save_head
from ..data.format import MANIFEST, DataError, StreamSpec, stream_names
from ..data.writer import ShardSetWriter, save_manifest
from ..errors import UserError
from ..runtime import distributed
from ..runtime.files import atomic_write_text
from ..runtime.run_lock import hold_run_lock

DONE_DIR = ".generate"
# test hook: the process SIGKILLs itself after finishing this many shards, with the next one half written
FAULT_ENV = "BLIP3O_FAST_FAULT_GENERATE_KILL"


def _one_shard(source: Dataset, split: str, index: int) -> Dataset:
    """A view of the source holding one shard as its only split: the evaluation reader then reads it in order."""
    record = source.manifest["splits"][split]["shards"][index]
    manifest = dict(source.manifest, splits={"shard": {"samples": record["samples"], "shards": [record]}})
    return Dataset(source.path, manifest)


def _check_source(source: Dataset, task, split: str) -> None:
    if (source.cond_dim, source.cond_tokens, source.cond_cls, tuple(source.grid)) != \
            (task.cond_dim, task.cond_tokens, task.cond_cls, tuple(task.grid)):
        raise DataError(f"{source.path} has conditions [{source.cond_tokens}, {source.cond_dim}] on a "
                        f"{source.grid[0]}x{source.grid[1]} grid but the model takes [{task.cond_tokens}, "
                        f"{task.cond_dim}] on {task.grid[0]}x{task.grid[1]}: generate from a dataset of its task")
    source.shards(split)  # a one-line error for a split it does not have


def _settings_check(out: Path, settings: dict) -> None:
    """A rerun resumes only what the same model and settings started."""
    path = out / DONE_DIR / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            changed = ", ".join(f"{k} {before.get(k)!r} -> {settings.get(k)!r}" for k in sorted(settings)
                                if before.get(k) != settings.get(k))
            raise UserError(f"{out} holds an unfinished generation with other settings ({changed}): rerun with the "
                            f"same ones to resume, or choose another --out")
    else:
        atomic_write_text(path, json.dumps(settings, indent=1))


def _done(out: Path, prefix: str) -> dict | None:
    path = out / DONE_DIR / f"{prefix}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if all((out / s["file"]).is_file() for s in record["shards"]) else None


def generate_dataset(gen, data: str | Path, out: str | Path, split: str = "eval", steps: int = 30,
                     sampler: str = "euler", guidance_scale: float = 1.0, timestep_shift: float = 1.0, seed: int = 0,
                     batch_size: int = 64, progress: bool = True, dist: distributed.Dist | None = None) -> dict | None:
    """Generates this rank's share; rank 0 returns {samples, shards, seconds, samples_per_s} after the manifest."""
    dist = dist or distributed.init()
    source = open_dataset(data)
    task = gen.task
    _check_source(source, task, split)
    out = Path(out).expanduser()
    if out.resolve() == source.path.resolve():
        raise UserError(f"--out {out} is the source dataset: write the generated dataset to another folder")
    if (out / MANIFEST).is_file() and not (out / DONE_DIR).is_dir():
        raise UserError(f"{out} already holds a dataset that `generate` did not start: choose another --out")
    # one job per output folder, as for a run folder: a second generate into it refuses, naming the holder
    with hold_run_lock(out, "generate", dist):
        settings = {"model": gen.provenance.source, "step": gen.provenance.step, "data": str(source.path),
                    "split": split, "steps": steps, "sampler": sampler, "guidance_scale": guidance_scale,
                    "timestep_shift": timestep_shift, "seed": seed}
        if dist.is_main:
            (out / DONE_DIR).mkdir(parents=True, exist_ok=True)
            _settings_check(out, settings)
        distributed.barrier()

        cond_spec = dataclasses.replace(source.cond, dtype="float16")
        target_spec = StreamSpec(stream_names(task.name)[1], f"blip3o-fast {task.name} ({gen.provenance.source})",
                                 task.target_dim, task.target_tokens, task.target_cls, "float16")
        text_spec = dataclasses.replace(source.text, dtype="float16") if source.text is not None else None
        shards = source.shards(split)
        mine = [i for i in range(len(shards)) if i % dist.world_size == dist.rank]
        todo = [i for i in mine if _done(out, f"{split}-{i:06d}") is None]
        if len(todo) < len(mine):
            print(f"generate rank {dist.rank}: {len(mine) - len(todo)} of {len(mine)} shards already finished, skipped")
        kill_after = int(os.environ.get(FAULT_ENV, "-1"))
        bar = tqdm(total=sum(shards[i].samples for i in todo), desc=f"generate rank {dist.rank}", unit="sample",
                   position=dist.rank, dynamic_ncols=True, disable=not progress or None)
        made, start = 0, time.perf_counter()
        for n, i in enumerate(todo):
            prefix = f"{split}-{i:06d}"
            count = 0
            with ShardSetWriter(out, prefix, cond_spec, target_spec, text_spec,
                                shard_size=max(1, shards[i].samples)) as writer:
                if shards[i].samples:
                    for batch in EvalLoader(_one_shard(source, split, i), "shard", batch_size, pin_memory=False):
                        feats = gen.generate(batch["cond"], steps, sampler, guidance_scale, timestep_shift, seed,
                                             batch_size=batch_size, keys=batch["key"])
                        for j, key in enumerate(batch["key"]):
                            text = batch["text"][j][batch["text_mask"][j]].numpy() if text_spec is not None else None
                            writer.write(key, batch["cond"][j].numpy(), feats[j].numpy(), text, batch["captions"][j],
                                         {"dataset": str(source.path), "split": split, "shard": shards[i].file})
                        count += len(batch["key"])
                        bar.update(len(batch["key"]))
                        if n == kill_after:
                            writer._file.flush()  # leave a half-written .partial shard behind
                            os.kill(os.getpid(), signal.SIGKILL)
            made += count
            record = {"source": shards[i].file, "samples": count, "shards": writer.records}
            atomic_write_text(out / DONE_DIR / f"{prefix}.json", json.dumps(record, indent=1))
        bar.close()
        seconds = time.perf_counter() - start
        rate = distributed.mean_across({"made": made, "rate": made / max(seconds, 1e-9)}, dist.device)
        distributed.barrier()
        if not dist.is_main:
            return None
        records = []
        for i in range(len(shards)):
            record = _done(out, f"{split}-{i:06d}")
            if record is None:
                raise DataError(f"input shard {shards[i].file} has no finished output: rerun the same command "
                                f"to finish")
            records.extend(record["shards"])
        if gen.head_weights is not None:  # the head of the generated stream: the model's own
            w = gen.head_weights.tensors
            save_head(out, w["post_layernorm.weight"], w["post_layernorm.bias"], w["visual_projection.weight"],
                      gen.head_weights.layer_norm_eps)
        save_manifest(out, task.name, task.grid, cond_spec, target_spec, text_spec, {split: records},
                      created_by={"command": "blip3o-fast generate", **settings})
        total = int(round(rate["made"] * dist.world_size))
        return {"samples": total, "shards": len(records), "seconds": seconds,
                "samples_per_s": rate["rate"] * dist.world_size}
