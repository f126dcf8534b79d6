"""`extract`: image shards (jpg/png + txt) -> both encoders' last-layer patch tokens as a dataset.

Encoders come from Hugging Face `transformers`, by name or local path: a CLIP checkpoint loads as
`CLIPModel` (its vision tower gives the tokens; its text tower embeds the captions; its
`post_layernorm` + `visual_projection` are saved as head.safetensors), a CLIP vision checkpoint as
`CLIPVisionModel`, anything else (EVA-CLIP-8B) through `AutoModel` (with `--trust-remote-code`), using
its `.vision_model` when it has one. Both encoders see the same pixels (one image processor).

An input shard (a local file, by its absolute path, or a URL webdataset opens: data/images.py) becomes
output shards `<split>-<name>_<hash>-<j:06d>.tar`, named by the source (its file name and a hash of it);
a record in `.extract/`, keyed by the same source, marks it finished, so a rerun skips it and tars 50-99
extracted tomorrow add to tars 0-49 of today. With `eval_fraction`, each image goes to the eval split or
the named one by a stable hash of its key (data/split.py). Images without a caption are skipped and
counted when captions are embedded (retrieval needs one per image); up to `max_captions` are kept.

Under `torchrun`, rank r takes input shards r, r + world, ...: the ranks share no process group, so no
collective can time out while one rank still works through longer shards; rank 0 waits for every
rank's records, then writes the manifest: every finished source of the folder, split by split.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoImageProcessor
from transformers.utils import logging as hf_logging

from ..errors import UserError
from ..runtime.files import atomic_write_text
from .encoders import VisionEncoder, load_clip_text, save_clip_head
from .format import (
    MANIFEST,
    DataError,
    StreamSpec,
    TextSpec,
    check_same_storage,
    open_dataset,
    parse_manifest,
    stream_names,
)
from .images import ImageShard, collate_images, expand_images, source_name
from .samples import SkipStats
from .split import check_fraction, held_out
from .stats import write_dataset_stats
from .writer import ShardSetWriter, save_manifest

DONE_DIR = ".extract"
EVAL_SPLIT = "eval"
POLL_S = 2.0  # rank 0's wait for the other ranks' records


@dataclass
class ExtractOptions:
    """Arguments of `blip3o-fast extract` (see its --help)."""

    images: str
    out: str
    target_model: str
    cond_model: str
    task: str = "eva_to_clip"
    split: str = "train"
    eval_fraction: float = 0.0
    max_captions: int = 5
    batch_size: int = 32
    workers: int = 4
    target_cls: bool = False
    cond_cls: bool = False
    shard_size: int = 1000
    dtype: str = "auto"
    storage: str = "float"  # of the condition tokens: float (float16) or int8 (§3.9.6)
    storage_target: str = "float"
    int8_scale: str = "channel"
    text_model: str | None = None
    image_processor: str | None = None
    trust_remote_code: bool = False
    progress: bool = True


def _source_id(url: str) -> str:
    """The name of a source's records and output shards: its file name and a hash of the whole source."""
    return f"{source_name(url)}_{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def _done_path(out: Path, url: str) -> Path:
    return out / DONE_DIR / f"{_source_id(url)}.json"


def _complete(out: Path, record: dict) -> bool:
    return all((out / s["file"]).is_file() for shards in record["splits"].values() for s in shards)


def _records(out: Path) -> dict[str, dict]:
    """Every finished source's record in `.extract/`, by source. Records of the earlier, index-keyed layout
    (`<split>-<i:06d>.json` with one split's `shards`) are read as the same source, so it is not extracted twice."""
    found = {}
    for path in sorted((out / DONE_DIR).glob("*.json")):
        record = json.loads(path.read_text())
        if "splits" not in record:
            split = path.stem.rsplit("-", 1)[0]
            record = {**record, "split": split, "eval_fraction": 0.0, "splits": {split: record["shards"]}}
        if _complete(out, record):
            source = record["source"]
            found[source if "://" in source or source.startswith("pipe:") else str(Path(source).resolve())] = record
    return found


def _finished(records: dict[str, dict], url: str, opt: ExtractOptions) -> dict | None:
    """The record of a finished source (from `_records`), or None; refused when it went to other splits."""
    record = records.get(url)
    if record is None:
        return None
    if (record["split"], record["eval_fraction"]) != (opt.split, opt.eval_fraction):
        raise DataError(f"{url} was extracted into split {record['split']!r} with --eval-fraction "
                        f"{record['eval_fraction']} before: rerun with those, or use another --out")
    return record


@dataclass
class Plan:
    """What every input shard is turned into: the encoders, the preprocessing and the output streams."""

    target: VisionEncoder
    cond: VisionEncoder
    processor: object
    text: object | None
    grid: tuple[int, int]
    cond_spec: StreamSpec
    target_spec: StreamSpec
    text_spec: TextSpec | None
    drop_target_cls: bool
    drop_cond_cls: bool


def extract(opt: ExtractOptions) -> dict | None:
    """Runs the extraction of this rank; rank 0 returns a summary after writing the manifest."""
    if not opt.progress:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    rank, world, local_rank = _ranks()
    check_fraction(opt.eval_fraction)
    if opt.eval_fraction and opt.split == EVAL_SPLIT:
        raise DataError(f"--eval-fraction holds images out into the {EVAL_SPLIT!r} split: give another --split")
    if opt.max_captions < 1:
        raise DataError(f"--max-captions must be at least 1, got {opt.max_captions}")
    urls = expand_images(opt.images)
    out = Path(opt.out).expanduser()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        opt.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    # everything that can be wrong with the models or the output folder fails here, before any work
    plan = _plan(opt, device, dtype)
    _check_output(out, plan)
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE_DIR).mkdir(exist_ok=True)
    if rank == 0 and plan.target.clip is not None:
        save_clip_head(plan.target.clip, out)  # the head belongs to the generated stream: only a CLIP target has one

    mine = [u for i, u in enumerate(urls) if i % world == rank]
    done = _records(out)
    todo = [u for u in mine if _finished(done, u, opt) is None]
    if len(todo) < len(mine):
        print(f"extract rank {rank}: {len(mine) - len(todo)} of {len(mine)} input shards already finished, skipped")
    bar = tqdm(desc=f"extract rank {rank}", unit="img", position=rank, disable=not opt.progress)
    for url in todo:
        _extract_shard(opt, plan, url, out, bar)
    bar.close()
    if rank != 0:
        return None
    _wait_for_others(out, urls, opt)
    return _write_manifest(opt, plan, urls, out, dtype)


def _ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a lone process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _wait_for_others(out: Path, urls: list[str], opt: ExtractOptions) -> None:
    """Rank 0 polls for every source's record: no deadline, since shards may be uneven (a rank that fails makes
    torchrun stop the others, this one included)."""
    said = False
    while True:
        done = _records(out)
        left = [u for u in urls if _finished(done, u, opt) is None]
        if not left:
            return
        if not said:
            print(f"extract rank 0: waiting for the other ranks ({len(left)} input shards left)")
            said = True
        time.sleep(POLL_S)


def _plan(opt: ExtractOptions, device: torch.device, dtype: torch.dtype) -> Plan:
    target = VisionEncoder(opt.target_model, device, dtype, opt.trust_remote_code)
    cond = VisionEncoder(opt.cond_model, device, dtype, opt.trust_remote_code)
    processor = _image_processor(opt)
    blank = processor(images=Image.new("RGB", (64, 64)), return_tensors="np")["pixel_values"]
    probe = torch.as_tensor(np.asarray(blank))
    t_tokens, t_dim, t_grid, t_has_cls = target.layout(probe)
    c_tokens, c_dim, c_grid, c_has_cls = cond.layout(probe)
    if t_grid != c_grid:
        raise UserError(f"--target-model gives a {t_grid[0]}x{t_grid[1]} patch grid but --cond-model "
                        f"{c_grid[0]}x{c_grid[1]} on the same {probe.shape[-1]}px images: pick encoders with the same "
                        f"grid (or an --image-processor size where they agree)")
    for flag, keep, has, enc in (("--target-cls", opt.target_cls, t_has_cls, target),
                                 ("--cond-cls", opt.cond_cls, c_has_cls, cond)):
        if keep and not has:
            raise UserError(f"{flag} asks for a CLS token but {enc.name} returns patch tokens only: drop {flag}")
    n = t_grid[0] * t_grid[1]
    cond_name, target_name = stream_names(opt.task)
    if opt.text_model:
        same = next((e for e in (target, cond) if e.name == opt.text_model and e.clip is not None), None)
        text = load_clip_text(opt.text_model, same.clip if same else None, device)
    else:
        clip = next((e for e in (target, cond) if e.clip is not None), None)
        text = load_clip_text(clip.name, clip.clip, device) if clip else None
    return Plan(target, cond, processor, text, t_grid,
                StreamSpec(cond_name, opt.cond_model, c_dim, n + int(opt.cond_cls), opt.cond_cls,
                           storage=opt.storage, scale=opt.int8_scale),
                StreamSpec(target_name, opt.target_model, t_dim, n + int(opt.target_cls), opt.target_cls,
                           storage=opt.storage_target, scale=opt.int8_scale),
                TextSpec(text.dim, opt.max_captions, None, text.name) if text else None,
                drop_target_cls=t_has_cls and not opt.target_cls, drop_cond_cls=c_has_cls and not opt.cond_cls)


def _image_processor(opt: ExtractOptions):
    """--image-processor, else the target's, else the condition's: one preprocessing for both encoders."""
    for name in (n for n in (opt.image_processor, opt.target_model, opt.cond_model) if n):
        try:
            return AutoImageProcessor.from_pretrained(name, trust_remote_code=opt.trust_remote_code)
        except (OSError, ValueError):
            if name == opt.image_processor:
                raise UserError(f"cannot load the image processor {name!r}: give a model name or folder with a "
                                f"preprocessor_config.json") from None
    raise UserError("neither model has an image processor (preprocessor_config.json): pass --image-processor")


def _check_output(out: Path, plan: Plan) -> None:
    """A dataset already in `out` (another split, or an earlier run) must have the same streams, stored alike."""
    if not (out / MANIFEST).is_file():
        return
    old_cond, old_target, _, old_grid = parse_manifest(json.loads((out / MANIFEST).read_text()), out / MANIFEST)
    new = (plan.cond_spec.dim, plan.cond_spec.tokens, plan.target_spec.dim, plan.target_spec.tokens, plan.grid)
    was = (old_cond.dim, old_cond.tokens, old_target.dim, old_target.tokens, old_grid)
    if new != was:
        raise DataError(f"{out} holds a dataset with cond {old_cond.tokens}x{old_cond.dim}, target "
                        f"{old_target.tokens}x{old_target.dim} but these encoders give cond "
                        f"{plan.cond_spec.tokens}x{plan.cond_spec.dim}, target "
                        f"{plan.target_spec.tokens}x{plan.target_spec.dim}: use another --out")
    check_same_storage(out, (old_cond, old_target), (plan.cond_spec, plan.target_spec))


def _extract_shard(opt: ExtractOptions, plan: Plan, url: str, out: Path, bar) -> None:
    """One input shard into output shards of its splits, then its record in `.extract/`."""
    stats = SkipStats()
    loader = torch.utils.data.DataLoader(ImageShard(url, plan.processor), batch_size=opt.batch_size,
                                         num_workers=opt.workers, collate_fn=collate_images)
    splits = [opt.split] + ([EVAL_SPLIT] if opt.eval_fraction else [])
    writers = {split: ShardSetWriter(out, f"{split}-{_source_id(url)}", plan.cond_spec, plan.target_spec,
                                     plan.text_spec, shard_size=opt.shard_size) for split in splits}
    where = source_name(url)
    try:
        for batch in loader:
            for key, reason in batch["bad"]:
                stats.skip_sample(reason, f"{where}:{key}")
            if plan.text is not None:  # retrieval needs a caption per image: count and skip those without
                for key in [k for k, caps in zip(batch["key"], batch["captions"]) if not caps]:
                    stats.skip_sample("no caption", f"{where}:{key}")
                batch = _keep(batch, [bool(caps) for caps in batch["captions"]])
            if batch["pixels"] is None:
                continue
            t_tok, c_tok = plan.target(batch["pixels"]), plan.cond(batch["pixels"])
            t_tok = t_tok[:, 1:] if plan.drop_target_cls else t_tok
            c_tok = c_tok[:, 1:] if plan.drop_cond_cls else c_tok
            t_np, c_np = t_tok.float().cpu().numpy(), c_tok.float().cpu().numpy()
            captions = [caps[:opt.max_captions] for caps in batch["captions"]]
            flat = [c for caps in captions for c in caps]
            emb = plan.text.embed(flat) if plan.text is not None and flat else None
            row = 0
            for j, key in enumerate(batch["key"]):
                k = len(captions[j])
                split = EVAL_SPLIT if held_out(key, opt.eval_fraction) else opt.split
                writers[split].write(key, c_np[j], t_np[j], None if emb is None else emb[row:row + k], captions[j],
                                     {"shard": url, "key": key})
                row += k
            bar.update(len(batch["key"]))
    finally:
        records = {split: w.close() for split, w in writers.items()}
    for w in writers.values():
        stats.samples += w.stats.samples
        for reason, count in w.stats.reasons.items():
            stats.reasons[reason] = stats.reasons.get(reason, 0) + count
        stats.skipped_samples += w.stats.skipped_samples
    record = {"source": url, "split": opt.split, "eval_fraction": opt.eval_fraction, "splits": records,
              "stats": stats.to_dict()}
    atomic_write_text(_done_path(out, url), json.dumps(record, indent=1))


def _keep(batch: dict, keep: list[bool]) -> dict:
    """The batch without the images where keep is False."""
    if all(keep):
        return batch
    index = [j for j, k in enumerate(keep) if k]
    return {"pixels": batch["pixels"][index] if index else None, "key": [batch["key"][j] for j in index],
            "captions": [batch["captions"][j] for j in index], "bad": []}


def _write_manifest(opt: ExtractOptions, plan: Plan, urls: list[str], out: Path, dtype: torch.dtype) -> dict:
    """Rank 0, once every rank is done: every finished source of the folder (this run's and earlier ones),
    split by split, in source order, into the manifest (splits of other producers kept)."""
    records = [r for _, r in sorted(_records(out).items())]
    splits: dict[str, list[dict]] = {}
    for record in records:
        for split, shards in record["splits"].items():
            splits.setdefault(split, []).extend(shards)
    ours = [r for source, r in sorted(_records(out).items()) if source in set(urls)]
    total = SkipStats(SkipStats.total([r["stats"] for r in ours]))
    save_manifest(out, opt.task, plan.grid, plan.cond_spec, plan.target_spec, plan.text_spec, splits,
                  created_by={"command": "blip3o-fast extract", "images": opt.images, "target_model": opt.target_model,
                              "cond_model": opt.cond_model, "dtype": str(dtype).replace("torch.", "")}, merge=True)
    if opt.split == "train":  # the shards came from several ranks and runs: one reading pass gives the statistics
        write_dataset_stats(open_dataset(out), "train", progress=opt.progress)
    if total.skipped_samples:
        print(f"extract: {total.summary()}; e.g. {'; '.join(list(total.examples)[:3])}")
    counts = {split: sum(s["samples"] for r in ours for s in r["splits"].get(split, [])) for split in splits}
    return {"samples": total.samples, "shards": sum(len(v) for v in splits.values()), "skipped": total.skipped_samples,
            "splits": counts, "sources": len(records)}
