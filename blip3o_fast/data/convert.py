"""`data convert-chunks`: the prior project's pickled embedding chunks -> our float16 shards.

The prior extraction wrote `embeddings_manifest.json` ({"shards": [{"output_path", "shard_idx",
"total_samples"}], "tokens_per_sample", "include_cls", ...}) beside `embeddings_shard_XXXXX_<mode>.pkl`
files: pickled dicts with `eva_blip3o_embeddings` [N, 256|257, 4096] and `clip_blip3o_embeddings`
[N, 256|257, 1024] (float32 tensors), `captions`, `keys` and `config` ({"include_cls", "tokens"}).
With 257 tokens the CLS token is first in both streams.

Unpickling runs code named by the file, so this refuses to load anything without `trust_pickle`.
Source shards are loaded one at a time; the source folder is only read.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np

from .format import DataError, StreamSpec, TextSpec, grid_of, stream_names
from .split import check_fraction, held_out
from .writer import ShardSetWriter, prepare_output, save_manifest

PRIOR_MANIFEST = "embeddings_manifest.json"
EVA_KEY, CLIP_KEY = "eva_blip3o_embeddings", "clip_blip3o_embeddings"


def _source_shards(src: Path, manifest: dict) -> list[Path]:
    """The pickled shards in shard order; manifest paths were absolute on another machine, so match by name."""
    entries = manifest.get("shards") or []
    paths = []
    for entry in sorted(entries, key=lambda e: e.get("shard_idx", 0)):
        name = Path(str(entry.get("output_path") or entry.get("path") or "")).name
        if name:
            paths.append(src / name)
    if not paths:
        paths = sorted(src.glob("embeddings_shard_*.pkl"))
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{src}: {len(missing)} shard files named in {PRIOR_MANIFEST} are missing "
                        f"(first: {missing[0]}); copy them beside the manifest")
    if not paths:
        raise DataError(f"{src} has no embeddings_shard_*.pkl files beside {PRIOR_MANIFEST}")
    return paths


def _load(path: Path) -> dict:
    # torch.save files are zip archives; the prior extractor used plain pickle.dump of torch tensors
    if zipfile.is_zipfile(path):
        import torch

        data = torch.load(path, map_location="cpu", weights_only=False)
    else:
        with open(path, "rb") as f:
            data = pickle.load(f)  # noqa: S301 - the caller passed --trust-pickle
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, not the prior project's shard dict")
    return data


def _array(x, path: Path, key: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    if x.ndim != 3:
        raise DataError(f"{path}: {key} has shape {list(x.shape)}, expected [N, tokens, dim]")
    return x


def convert_chunks(src, out, trust_pickle: bool = False, task: str = "eva_to_clip", shard_size: int = 500,
                   eval_shards: int = 0, grid: tuple[int, int] | None = None, clip_model: str | None = None,
                   overwrite: bool = False, progress: bool = True, eval_fraction: float = 0.0) -> dict:
    """Converts every source shard; the last `eval_shards` go to the eval split, or the samples whose key
    hashes below `eval_fraction` (data/split.py). Returns a summary."""
    from tqdm import tqdm

    src, out = Path(src).expanduser(), Path(out).expanduser()
    manifest_path = src / PRIOR_MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{src} has no {PRIOR_MANIFEST}: point --src at the prior project's embeddings folder")
    if not trust_pickle:
        raise DataError(f"the shards in {src} are pickle files, and loading a pickle runs whatever code it names: "
                        f"if you made them (or trust who did), rerun with --trust-pickle")
    if out.resolve() == src.resolve():
        raise DataError("--out must differ from --src (the source folder is never written to)")
    try:
        prior = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{manifest_path} is not valid JSON ({e})") from None
    paths = _source_shards(src, prior)
    if not 0 <= eval_shards < len(paths):
        raise DataError(f"--eval-shards {eval_shards} must be below the {len(paths)} source shards")
    if check_fraction(eval_fraction) and eval_shards:
        raise DataError("--eval-shards and --eval-fraction both choose the eval split: give one of them")

    first = _load(paths[0])
    eva, clip = _array(first[EVA_KEY], paths[0], EVA_KEY), _array(first[CLIP_KEY], paths[0], CLIP_KEY)
    tokens = int(prior.get("tokens_per_sample") or eva.shape[1])
    config = first.get("config") or {}
    # 257 = 16x16 + CLS; when neither manifest nor config says, a non-square count means a CLS token
    cls = bool(prior.get("include_cls", config.get("include_cls", math.isqrt(tokens) ** 2 != tokens)))
    grid = tuple(grid) if grid else grid_of(tokens, cls)
    del first, eva, clip
    dims: dict[str, int | None] = {"cond": None, "target": None}

    encoder = None
    if clip_model:
        from .encoders import load_clip_text

        encoder = load_clip_text(clip_model)
    prepare_output(out, overwrite)
    cond_name, target_name = stream_names(task)
    cond_key, target_key = (EVA_KEY, CLIP_KEY) if task == "eva_to_clip" else (CLIP_KEY, EVA_KEY)
    writers: dict[str, ShardSetWriter] = {}
    seen: set[str] = set()
    bar = tqdm(total=int(prior.get("total_samples") or 0) or None, unit="sample", desc="convert", disable=not progress)
    for n, path in enumerate(paths):
        shard_split = "eval" if n >= len(paths) - eval_shards else "train"
        data = _load(path)  # one source shard in memory at a time
        for key in (EVA_KEY, CLIP_KEY, "captions"):
            if key not in data:
                raise DataError(f"{path} has no {key!r}: is it one of the prior project's embedding shards?")
        cond, target = _array(data[cond_key], path, cond_key), _array(data[target_key], path, target_key)
        count = cond.shape[0]
        if target.shape[0] != count or len(data["captions"]) != count or cond.shape[1] != tokens \
                or target.shape[1] != tokens:
            raise DataError(f"{path}: cond {list(cond.shape)}, target {list(target.shape)} and "
                            f"{len(data['captions'])} captions disagree (expected {tokens} tokens each)")
        for name, x in (("cond", cond), ("target", target)):
            if dims[name] is None:
                dims[name] = x.shape[2]
            elif dims[name] != x.shape[2]:
                raise DataError(f"{path}: {name} dim {x.shape[2]} differs from the first shard's {dims[name]}")
        specs = (StreamSpec(cond_name, _model(data, cond_key), dims["cond"], tokens, cls),
                 StreamSpec(target_name, _model(data, target_key), dims["target"], tokens, cls),
                 TextSpec(encoder.dim, 1, 1, clip_model) if encoder else None)
        captions = [str(c) for c in data["captions"]]
        keys = [str(k) for k in data.get("keys") or [f"{n:05d}_{i:06d}" for i in range(count)]]
        text = encoder.embed(captions) if encoder else None
        for i in range(count):
            key = keys[i]
            while key in seen:  # keys must be unique within the dataset
                key = f"{key}-{n:05d}"
            seen.add(key)
            split = "eval" if held_out(key, eval_fraction) else shard_split
            if split not in writers:
                writers[split] = ShardSetWriter(out, split, *specs, shard_size=shard_size)
            writers[split].write(key, cond[i], target[i], None if text is None else text[i:i + 1], [captions[i]],
                                 {"file": path.name, "index": i, "key": keys[i]})
            bar.update(1)
        del data, cond, target
    bar.close()
    records = {split: w.close() for split, w in writers.items()}
    some = next(iter(writers.values()))
    if encoder is not None and task == "eva_to_clip":
        encoder.save_head(out)
    save_manifest(out, task, grid, some.cond, some.target, some.text, records,
                  created_by={"command": "blip3o-fast data convert-chunks", "src": str(src),
                              "prior_format": prior.get("format_version")},
                  stats=writers["train"].channel_stats() if "train" in writers else None)
    return {"splits": {split: {"samples": w.stats.samples, "shards": len(records[split]),
                               "skipped": w.stats.skipped_samples} for split, w in writers.items()}}


def _model(data: dict, key: str) -> str:
    config = data.get("config") or {}
    return str(config.get("eva_model" if key == EVA_KEY else "clip_model", "BAAI/EVA-CLIP-8B" if key == EVA_KEY
                          else "openai/clip-vit-large-patch14"))
