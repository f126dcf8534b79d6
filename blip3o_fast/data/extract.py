"""`extract`: image shards (jpg/png + txt) -> both encoders' last-layer patch tokens as a dataset.

Encoders come from Hugging Face `transformers`, by name or local path: a CLIP checkpoint loads as
`CLIPModel` (its vision tower gives the tokens; its text tower embeds the captions; its
`post_layernorm` + `visual_projection` are saved as head.safetensors), a CLIP vision checkpoint as
`CLIPVisionModel`, anything else (EVA-CLIP-8B) through `AutoModel` (with `--trust-remote-code`), using
its `.vision_model` when it has one. Both encoders see the same pixels (one image processor).

Input shard i becomes output shards `<split>-<i:06d>-<j:06d>.tar`; a record in `.extract/` marks it
finished, so a rerun skips it. Under `torchrun`, rank r takes input shards r, r + world, ...; rank 0
writes the manifest once every rank is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoImageProcessor
from transformers.utils import logging as hf_logging

from ..errors import UserError
from ..runtime import distributed
from ..runtime.files import atomic_write_text
from .encoders import VisionEncoder, load_clip_text, save_clip_head
from .format import MANIFEST, DataError, StreamSpec, TextSpec, open_dataset, parse_manifest, stream_names
from .images import ImageShard, collate_images, expand_images
from .samples import SkipStats
from .stats import write_dataset_stats
from .writer import ShardSetWriter, save_manifest

DONE_DIR = ".extract"


@dataclass
class ExtractOptions:
    """Arguments of `blip3o-fast extract` (see its --help)."""

    images: str
    out: str
    target_model: str
    cond_model: str
    task: str = "eva_to_clip"
    split: str = "train"
    batch_size: int = 32
    workers: int = 4
    target_cls: bool = False
    cond_cls: bool = False
    shard_size: int = 1000
    dtype: str = "auto"
    text_model: str | None = None
    image_processor: str | None = None
    trust_remote_code: bool = False
    progress: bool = True

def _done_path(out: Path, prefix: str) -> Path:
    return out / DONE_DIR / f"{prefix}.json"


def _finished(out: Path, prefix: str) -> dict | None:
    path = _done_path(out, prefix)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if all((out / s["file"]).is_file() for s in record["shards"]) else None


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
    dist = _dist()
    urls = expand_images(opt.images)
    out = Path(opt.out).expanduser()
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        opt.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    # everything that can be wrong with the models or the output folder fails here, before any work
    plan = _plan(opt, device, dtype)
    _check_output(out, plan)
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE_DIR).mkdir(exist_ok=True)
    if dist.rank == 0 and plan.target.clip is not None:
        save_clip_head(plan.target.clip, out)  # the head belongs to the generated stream: only a CLIP target has one

    mine = [(i, u) for i, u in enumerate(urls) if i % dist.world_size == dist.rank]
    todo = [(i, u) for i, u in mine if _finished(out, f"{opt.split}-{i:06d}") is None]
    if len(todo) < len(mine):
        print(f"extract rank {dist.rank}: {len(mine) - len(todo)} of {len(mine)} input shards already finished, "
              f"skipped")
    bar = tqdm(desc=f"extract rank {dist.rank}", unit="img", position=dist.rank, disable=not opt.progress)
    for i, url in todo:
        _extract_shard(opt, plan, url, out, f"{opt.split}-{i:06d}", bar)
    bar.close()
    distributed.barrier()
    if dist.rank != 0:
        return None
    return _write_manifest(opt, plan, urls, out, dtype)


def _dist() -> distributed.Dist:
    return distributed.init(backend="gloo")  # only barriers: the encoders run independently per rank


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
                StreamSpec(cond_name, opt.cond_model, c_dim, n + int(opt.cond_cls), opt.cond_cls),
                StreamSpec(target_name, opt.target_model, t_dim, n + int(opt.target_cls), opt.target_cls),
                TextSpec(text.dim, 1, 1, text.name) if text else None,
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
    """A dataset already in `out` (another split, or an earlier run) must have the same streams."""
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


def _extract_shard(opt: ExtractOptions, plan: Plan, url: str, out: Path, prefix: str, bar) -> None:
    """One input shard into output shards `<prefix>-NNNNNN.tar`, then its record in `.extract/`."""
    stats = SkipStats()
    loader = torch.utils.data.DataLoader(ImageShard(url, plan.processor), batch_size=opt.batch_size,
                                         num_workers=opt.workers, collate_fn=collate_images)
    with ShardSetWriter(out, prefix, plan.cond_spec, plan.target_spec, plan.text_spec,
                        shard_size=opt.shard_size) as writer:
        for batch in loader:
            for key, reason in batch["bad"]:
                stats.skip_sample(reason, f"{Path(url).name}:{key}")
            if batch["pixels"] is None:
                continue
            t_tok, c_tok = plan.target(batch["pixels"]), plan.cond(batch["pixels"])
            t_tok = t_tok[:, 1:] if plan.drop_target_cls else t_tok
            c_tok = c_tok[:, 1:] if plan.drop_cond_cls else c_tok
            t_np, c_np = t_tok.float().cpu().numpy(), c_tok.float().cpu().numpy()
            flat = [c for caps in batch["captions"] for c in caps]
            emb = plan.text.embed(flat) if plan.text is not None and flat else None
            row = 0
            for j, key in enumerate(batch["key"]):
                k = len(batch["captions"][j])
                writer.write(key, c_np[j], t_np[j], None if emb is None else emb[row:row + k],
                             batch["captions"][j], {"shard": Path(url).name, "key": key})
                row += k
            bar.update(len(batch["key"]))
    stats.samples = writer.stats.samples
    for reason, count in writer.stats.reasons.items():
        stats.reasons[reason] = stats.reasons.get(reason, 0) + count
    stats.skipped_samples += writer.stats.skipped_samples
    record = {"source": url, "shards": writer.records, "stats": stats.to_dict()}
    atomic_write_text(_done_path(out, prefix), json.dumps(record, indent=1))


def _write_manifest(opt: ExtractOptions, plan: Plan, urls: list[str], out: Path, dtype: torch.dtype) -> dict:
    """Rank 0, once every rank is done: the split's records into the manifest (other splits kept)."""
    records, total = [], SkipStats()
    for i, url in enumerate(urls):
        record = _finished(out, f"{opt.split}-{i:06d}")
        if record is None:
            raise DataError(f"input shard {url} has no finished output: rerun the same extract command to finish it")
        records.extend(record["shards"])
        total = SkipStats(SkipStats.total([total.to_dict(), record["stats"]]))
    save_manifest(out, opt.task, plan.grid, plan.cond_spec, plan.target_spec, plan.text_spec, {opt.split: records},
                  created_by={"command": "blip3o-fast extract", "images": opt.images, "target_model": opt.target_model,
                              "cond_model": opt.cond_model, "dtype": str(dtype).replace("torch.", "")}, merge=True)
    if opt.split == "train":  # the shards came from several ranks and runs: one reading pass gives the statistics
        write_dataset_stats(open_dataset(out), "train", progress=opt.progress)
    if total.skipped_samples:
        print(f"extract: {total.summary()}; e.g. {'; '.join(list(total.examples)[:3])}")
    return {"samples": total.samples, "shards": len(records), "skipped": total.skipped_samples}
