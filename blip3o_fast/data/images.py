"""The image side of `extract`: input tar shards (brace patterns, folders, remote URLs) read with webdataset,
one decoded, preprocessed image and its captions per sample; bad images are reported, not raised.

Remote shards are opened the way webdataset opens them (its `gopen`): `pipe:CMD` reads CMD's stdout,
`http(s)://` goes through curl; `s3://` becomes `pipe:aws s3 cp URL -` (webdataset has no s3 opener).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")  # what webdataset opens (+ s3)


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE)


def expand_images(pattern: str) -> list[str]:
    """Input shards of a brace pattern ('DIR/{00000..00009}.tar', also of a URL) or every *.tar of a folder; local
    files are checked to exist and named by their absolute path (the resume records are keyed by it)."""
    import braceexpand

    if is_remote(pattern):
        return list(braceexpand.braceexpand(pattern))
    path = Path(pattern).expanduser()
    urls = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else list(braceexpand.braceexpand(str(path)))
    if not urls:
        raise UserError(f"--images {pattern!r} names no shards: give 'DIR/{{00000..00009}}.tar' or a folder of .tar")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(urls)} image shards do not exist (first: {missing[0]}): fix --images")
    return [str(Path(u).resolve()) for u in urls]


def opener_url(url: str) -> str:
    """What webdataset's gopen is given: s3 through the AWS CLI, everything else as is."""
    return f"pipe:aws s3 cp {url} -" if url.startswith("s3://") else url


def source_name(url: str) -> str:
    """A short file-name-safe name of a source ('pipe:cat /d/00012.tar' -> '00012')."""
    last = re.split(r"[\s/:]+", url.strip().rstrip("-").strip())
    stem = next((p for p in reversed(last) if p), "shard")
    stem = stem[:-4] if stem.endswith(".tar") else stem
    return re.sub(r"[^A-Za-z0-9_]", "_", stem)[:40] or "shard"


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

        for p, sample in enumerate(wds.tarfile_samples([{"url": opener_url(self.url)}], handler=handler)):
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
    """The captions of a sample: a .json's "captions" list (COCO's 5) or "caption"/"text", a .txt (one caption, or
    a JSON list of them); empty ones dropped."""
    found: list = []
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, list):
            found = meta
        elif isinstance(meta, dict):
            value = meta.get("captions") or meta.get("caption") or meta.get("text")
            found = value if isinstance(value, list) else [value]
    if not any(found) and "txt" in sample:
        text = sample["txt"].decode("utf-8", "replace").strip()
        found = [text]
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None
            found = parsed if isinstance(parsed, list) else found
    return [str(c).strip() for c in found if c is not None and str(c).strip()]


def collate_images(items: list[dict]) -> dict:
    good = [x for x in items if x["bad"] is None]
    return {"pixels": torch.stack([x["pixels"] for x in good]) if good else None,
            "key": [x["key"] for x in good], "captions": [x["captions"] for x in good],
            "bad": [(x["key"], x["bad"]) for x in items if x["bad"] is not None]}
