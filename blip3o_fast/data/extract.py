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

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .format import MANIFEST, DataError, StreamSpec, TextSpec, parse_manifest, stream_names
from .head import save_head
from .samples import SkipStats
from .writer import ShardSetWriter, save_manifest

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
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


def _load(kind, name: str, what: str, **kw):
    """from_pretrained with the usual failures turned into one-line UserErrors."""
    try:
        return kind.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        text = str(e)
        if "trust_remote_code" in text:
            raise UserError(f"{what} {name} ships its own model code: pass --trust-remote-code if you trust "
                            f"it") from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise UserError(f"cannot load {what} {name!r} ({first}): give a Hugging Face model name or a local "
                        f"folder saved with save_pretrained") from None


def _config(name: str, trust: bool):
    from transformers import AutoConfig

    return _load(AutoConfig, name, "model config", trust_remote_code=trust)


class ClipText:
    """A CLIP model's text tower (captions -> projected embeddings) and its image head."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.dim = int(model.text_projection.out_features)
        self.device = next(model.parameters()).device
        limit = getattr(model.config.text_config, "max_position_embeddings", 77)
        self.max_length = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)

    @torch.no_grad()
    def embed(self, captions: list[str], chunk: int = 256) -> np.ndarray:
        """[n, Dg] float32 text embeddings (as CLIPModel.get_text_features computes them)."""
        out = []
        for i in range(0, len(captions), chunk):
            tok = self.tokenizer(captions[i:i + chunk], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            text = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            pooled = text.pooler_output
            out.append(self.model.text_projection(pooled).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def save_head(self, folder) -> Path:
        return save_clip_head(self.model, folder)


def save_clip_head(model, folder) -> Path:
    """head.safetensors from a CLIPModel: vision post_layernorm and visual_projection."""
    vision = model.vision_model
    return save_head(folder, vision.post_layernorm.weight, vision.post_layernorm.bias,
                     model.visual_projection.weight, vision.post_layernorm.eps)


def load_clip_text(name: str, model=None, device: str = "cpu") -> ClipText:
    """The text tower of a full CLIP checkpoint (CLIPModel), reusing `model` when it is already loaded."""
    from transformers import AutoTokenizer, CLIPModel

    if model is None:
        config = _config(name, False)
        if config.model_type != "clip":
            raise UserError(f"{name} is a {config.model_type} model, not a full CLIP checkpoint with a text tower: "
                            f"give a CLIP model (e.g. openai/clip-vit-large-patch14)")
        model = _load(CLIPModel, name, "CLIP model").to(device).eval()
    return ClipText(model, _load(AutoTokenizer, name, "tokenizer of"), name)


class VisionEncoder:
    """A vision tower returning last-layer tokens [B, T, D] (CLS first when it has one)."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
        from transformers import AutoModel, CLIPModel, CLIPVisionModel

        self.name = name
        config = _config(name, trust_remote_code)
        self.clip = None
        if config.model_type == "clip":
            self.clip = _load(CLIPModel, name, "CLIP model", dtype=dtype)
            model = self.clip
            self.vision = self.clip.vision_model
        elif config.model_type == "clip_vision_model":
            model = _load(CLIPVisionModel, name, "CLIP vision model", dtype=dtype)
            self.vision = model.vision_model
        else:
            model = _load(AutoModel, name, "model", dtype=dtype, trust_remote_code=trust_remote_code)
            self.vision = getattr(model, "vision_model", model)
        model.to(device).eval()
        vc = getattr(config, "vision_config", config)
        self.patch_size = getattr(vc, "patch_size", None)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=pixels.to(self.device, self.dtype))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def layout(self, pixels: torch.Tensor) -> tuple[int, int, tuple[int, int], bool]:
        """(tokens, dim, grid, has_cls) from one probe forward pass."""
        tokens, dim = self(pixels).shape[1:]
        h, w = pixels.shape[-2:]
        if self.patch_size:
            grid = (h // self.patch_size, w // self.patch_size)
        else:
            side = int(round((tokens - 1) ** 0.5))
            grid = (side, side) if side * side == tokens - 1 else (int(round(tokens ** 0.5)),) * 2
        extra = tokens - grid[0] * grid[1]
        if extra not in (0, 1):
            raise UserError(f"{self.name} returns {tokens} tokens for a {grid[0]}x{grid[1]} patch grid: only "
                            f"patch tokens with an optional leading CLS token are supported")
        return tokens, dim, grid, extra == 1


def expand_images(pattern: str) -> list[str]:
    """Input shards of a brace pattern ('DIR/{00000..00009}.tar') or every *.tar of a folder, checked to exist."""
    import braceexpand

    path = Path(pattern).expanduser()
    urls = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else list(braceexpand.braceexpand(pattern))
    if not urls:
        raise UserError(f"--images {pattern!r} names no shards: give 'DIR/{{00000..00009}}.tar' or a folder of .tar")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(urls)} image shards do not exist (first: {missing[0]}): fix --images")
    return urls


class ImageShard(torch.utils.data.IterableDataset):
    """Decoded, preprocessed images of one tar; DataLoader workers take every W-th sample."""

    def __init__(self, url: str, processor):
        self.url, self.processor = url, processor

    def __iter__(self):
        import webdataset as wds
        from PIL import Image

        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        errors = []

        def handler(exn):
            errors.append(str(exn).splitlines()[0][:200])
            return False  # a broken tar stream cannot be resynchronised: stop this shard

        for p, sample in enumerate(wds.tarfile_samples([{"url": self.url}], handler=handler)):
            if p % n != w:
                continue
            key = sample["__key__"].split("/")[-1]
            image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if image is None:
                yield {"key": key, "bad": "no image"}
                continue
            try:
                pil = Image.open(io.BytesIO(image)).convert("RGB")
                pixels = torch.as_tensor(np.asarray(self.processor(images=pil, return_tensors="np")["pixel_values"][0]))
            except Exception as e:  # PIL raises many types for damaged images
                yield {"key": key, "bad": f"undecodable image ({type(e).__name__})"}
                continue
            yield {"key": key, "pixels": pixels, "captions": _captions(sample), "bad": None}
        if errors and w == 0:
            yield {"key": Path(self.url).name, "bad": "unreadable image shard", "detail": errors[0]}


def _captions(sample: dict) -> list[str]:
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", "replace").strip()
        return [text] if text else []
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return []
        caption = meta.get("caption") or meta.get("text") if isinstance(meta, dict) else None
        return [str(caption)] if caption else []
    return []


def _collate(items: list[dict]) -> dict:
    good = [x for x in items if x["bad"] is None]
    return {"pixels": torch.stack([x["pixels"] for x in good]) if good else None,
            "key": [x["key"] for x in good], "captions": [x["captions"] for x in good],
            "bad": [(x["key"], x["bad"]) for x in items if x["bad"] is not None]}


def _dist() -> tuple[int, int, int]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")  # only barriers: the encoders run independently per rank
    return rank, world, local


def _done_path(out: Path, prefix: str) -> Path:
    return out / DONE_DIR / f"{prefix}.json"


def _finished(out: Path, prefix: str) -> dict | None:
    path = _done_path(out, prefix)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if all((out / s["file"]).is_file() for s in record["shards"]) else None


def extract(opt: ExtractOptions) -> dict | None:
    """Runs the extraction of this rank; rank 0 returns a summary after writing the manifest."""
    from tqdm import tqdm
    from transformers import AutoImageProcessor

    if not opt.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    rank, world, local = _dist()
    urls = expand_images(opt.images)
    out = Path(opt.out).expanduser()
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        opt.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)

    # everything that can be wrong with the models or the output folder fails here, before any work
    target = VisionEncoder(opt.target_model, device, dtype, opt.trust_remote_code)
    cond = VisionEncoder(opt.cond_model, device, dtype, opt.trust_remote_code)
    names = [n for n in (opt.image_processor, opt.target_model, opt.cond_model) if n]
    processor = None
    for name in names:
        try:
            processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=opt.trust_remote_code)
            break
        except (OSError, ValueError):
            if name == opt.image_processor:
                raise UserError(f"cannot load the image processor {name!r}: give a model name or folder with a "
                                f"preprocessor_config.json") from None
    if processor is None:
        raise UserError("neither model has an image processor (preprocessor_config.json): pass --image-processor")
    from PIL import Image

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
    grid = t_grid
    n = grid[0] * grid[1]
    cond_name, target_name = stream_names(opt.task)
    cond_spec = StreamSpec(cond_name, opt.cond_model, c_dim, n + int(opt.cond_cls), opt.cond_cls)
    target_spec = StreamSpec(target_name, opt.target_model, t_dim, n + int(opt.target_cls), opt.target_cls)

    text = None
    if opt.text_model:
        same = next((e for e in (target, cond) if e.name == opt.text_model and e.clip is not None), None)
        text = load_clip_text(opt.text_model, same.clip if same else None, device)
    else:
        clip = next((e for e in (target, cond) if e.clip is not None), None)
        text = load_clip_text(clip.name, clip.clip, device) if clip else None
    text_spec = TextSpec(text.dim, 1, 1, text.name) if text else None

    if (out / MANIFEST).is_file():
        old_cond, old_target, old_text, old_grid = parse_manifest(json.loads((out / MANIFEST).read_text()),
                                                                  out / MANIFEST)
        new = (cond_spec.dim, cond_spec.tokens, target_spec.dim, target_spec.tokens, grid)
        was = (old_cond.dim, old_cond.tokens, old_target.dim, old_target.tokens, old_grid)
        if new != was:
            raise DataError(f"{out} holds a dataset with cond {old_cond.tokens}x{old_cond.dim}, target "
                            f"{old_target.tokens}x{old_target.dim} but these encoders give cond "
                            f"{cond_spec.tokens}x{cond_spec.dim}, target {target_spec.tokens}x{target_spec.dim}: "
                            f"use another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE_DIR).mkdir(exist_ok=True)
    if rank == 0 and target.clip is not None:
        save_clip_head(target.clip, out)  # the head belongs to the generated stream: only a CLIP target has one

    mine = [(i, u) for i, u in enumerate(urls) if i % world == rank]
    todo = [(i, u) for i, u in mine if _finished(out, f"{opt.split}-{i:06d}") is None]
    if len(todo) < len(mine):
        print(f"extract rank {rank}: {len(mine) - len(todo)} of {len(mine)} input shards already finished, skipped")
    bar = tqdm(desc=f"extract rank {rank}", unit="img", position=rank, disable=not opt.progress)
    for i, url in todo:
        prefix = f"{opt.split}-{i:06d}"
        stats = SkipStats()
        loader = torch.utils.data.DataLoader(ImageShard(url, processor), batch_size=opt.batch_size,
                                             num_workers=opt.workers, collate_fn=_collate)
        with ShardSetWriter(out, prefix, cond_spec, target_spec, text_spec, shard_size=opt.shard_size) as writer:
            for batch in loader:
                for key, reason in batch["bad"]:
                    stats.skip_sample(reason, f"{Path(url).name}:{key}")
                if batch["pixels"] is None:
                    continue
                t_tok, c_tok = target(batch["pixels"]), cond(batch["pixels"])
                if t_has_cls and not opt.target_cls:
                    t_tok = t_tok[:, 1:]
                if c_has_cls and not opt.cond_cls:
                    c_tok = c_tok[:, 1:]
                t_np, c_np = t_tok.float().cpu().numpy(), c_tok.float().cpu().numpy()
                flat = [c for caps in batch["captions"] for c in caps]
                emb = text.embed(flat) if text is not None and flat else None
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
        tmp = _done_path(out, prefix).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, _done_path(out, prefix))
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    records, total = [], SkipStats()
    for i, url in enumerate(urls):
        record = _finished(out, f"{opt.split}-{i:06d}")
        if record is None:
            raise DataError(f"input shard {url} has no finished output: rerun the same extract command to finish it")
        records.extend(record["shards"])
        total = SkipStats(SkipStats.total([total.to_dict(), record["stats"]]))
    save_manifest(out, opt.task, grid, cond_spec, target_spec, text_spec, {opt.split: records},
                  created_by={"command": "blip3o-fast extract", "images": opt.images, "target_model": opt.target_model,
                              "cond_model": opt.cond_model, "dtype": str(dtype).replace("torch.", "")}, merge=True)
    if total.skipped_samples:
        print(f"extract: {total.summary()}; e.g. {'; '.join(list(total.examples)[:3])}")
    return {"samples": total.samples, "shards": len(records), "skipped": total.skipped_samples}
