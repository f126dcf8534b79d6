"""The image side of `extract`: input tar shards (brace patterns, folders) read with webdataset, one
decoded, preprocessed image and its captions per sample; bad images are reported, not raised."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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


def collate_images(items: list[dict]) -> dict:
    good = [x for x in items if x["bad"] is None]
    return {"pixels": torch.stack([x["pixels"] for x in good]) if good else None,
            "key": [x["key"] for x in good], "captions": [x["captions"] for x in good],
            "bad": [(x["key"], x["bad"]) for x in items if x["bad"] is not None]}
