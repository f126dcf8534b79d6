"""`data inspect`: what a dataset holds, whether its shards are intact, and the scale of its tokens."""

from __future__ import annotations

import json

import numpy as np

from .format import open_dataset
from .reader import EvalLoader
from .stats import read_stats
from .writer import sha256_file


def verify_shards(dataset, progress: bool = True) -> list[dict]:
    """sha256 of every shard against the manifest: [{split, file, status}] for the ones that fail."""
    from tqdm import tqdm

    shards = [(name, s) for name in dataset.split_names() for s in dataset.shards(name)]
    problems = []
    for name, shard in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        if not shard.path.is_file():
            problems.append({"split": name, "file": shard.file, "status": "missing"})
        elif shard.sha256 and sha256_file(shard.path) != shard.sha256:
            problems.append({"split": name, "file": shard.file, "status": "sha256 mismatch"})
    return problems


def _norms(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}


def token_norms(dataset, split: str, samples: int) -> dict:
    """Per-token L2 norm statistics of the first `samples` samples: cond/target patches, CLS tokens, text."""
    parts: dict[str, list[np.ndarray]] = {}
    seen = 0
    loader = EvalLoader(dataset, split, batch_size=min(64, max(samples, 1)), pin_memory=False)
    for batch in loader:
        take = min(len(batch["key"]), samples - seen)
        for stream, cls in (("cond", dataset.cond_cls), ("target", dataset.target_cls)):
            if stream not in batch:  # conditions only
                continue
            norms = batch[stream][:take].float().norm(dim=-1).numpy()
            parts.setdefault(f"{stream} patch", []).append(norms[:, int(cls):].ravel())
            if cls:
                parts.setdefault(f"{stream} cls", []).append(norms[:, 0])
        if "text" in batch:
            norms = batch["text"][:take].float().norm(dim=-1).numpy()
            parts.setdefault("text", []).append(norms[batch["text_mask"][:take].numpy()])
        seen += take
        if seen >= samples:
            break
    out = {name: _norms(np.concatenate(v)) for name, v in parts.items() if sum(map(len, v))}
    out["samples"] = seen
    out["skipped"] = loader.stats()["skipped_samples"]
    return out


def channel_spread(ds) -> dict | None:
    """From stats.safetensors: how uneven the channels are (largest std / median std): CLIP's outliers show here."""
    stats = read_stats(ds.path, ds.cond_dim, ds.target_dim)
    if stats is None:
        return None
    out = {"split": stats.split, "samples": stats.samples}
    for name, std in (("cond", stats.cond_std), ("target", stats.target_std)):
        if std is not None:
            out[name] = {"std_min": float(std.min()), "std_median": float(std.median()), "std_max": float(std.max())}
    return out


def inspect_dataset(path, verify: bool = True, samples: int = 256, as_json: bool = False,
                    progress: bool = True) -> int:
    """Prints the report; returns 1 when a shard is missing or damaged, else 0."""
    ds = open_dataset(path)
    report = {
        "path": str(ds.path), "task": ds.task, "grid": list(ds.grid),
        "streams": {"cond": ds.cond.to_dict(), "target": ds.target.to_dict() if ds.target else None},
        "text": ds.text.to_dict() if ds.text else None,
        "head": str(ds.head_path.name) if ds.head_path else None,
        "stats": channel_spread(ds),
        "splits": {}, "problems": verify_shards(ds, progress) if verify else None,
    }
    for name in ds.split_names():
        shards = ds.shards(name)
        size = sum(s.path.stat().st_size for s in shards if s.path.is_file())
        count = ds.split_samples(name)
        report["splits"][name] = {"samples": count, "shards": len(shards), "bytes": size,
                                  "bytes_per_sample": round(size / count) if count else None,
                                  "norms": token_norms(ds, name, samples) if samples and shards else {}}
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        _print(report)
    return 1 if report["problems"] else 0


def _print(r: dict) -> None:
    print(f"dataset  {r['path']}")
    print(f"task     {r['task']}   grid {r['grid'][0]}x{r['grid'][1]}   head {r['head'] or 'none'}")
    for which, s in r["streams"].items():
        if s is None:
            print(f"{which:8s} none (conditions only)")
            continue
        stored = (f"int8 + float32 scale per {s['scale']} (read as {s['dtype']})" if s.get("storage") == "int8"
                  else s["dtype"])
        print(f"{which:8s} {s['name']} ({s['model']}): [{s['tokens']}, {s['dim']}] {stored}"
              f"{' with CLS first' if s['cls'] else ''}")
    if r["text"]:
        t = r["text"]
        per = t["captions_per_sample"] or f"up to {t['max_captions']}"
        print(f"text     [{per} captions, {t['dim']}] ({t['model']})")
    st = r["stats"]
    if st is None:
        print("stats    none (flow.target_norm needs them: blip3o-fast data stats DATASET)")
    else:
        spread = "; ".join(f"{k} channel std {v['std_min']:.3g} / {v['std_median']:.3g} / {v['std_max']:.3g}"
                           for k, v in st.items() if isinstance(v, dict))
        print(f"stats    {st['split']} split, {st['samples']} samples; {spread} (min / median / max)")
    for name, s in r["splits"].items():
        per = f", {s['bytes_per_sample'] / 1e3:.1f} kB per sample" if s["bytes_per_sample"] else ""
        print(f"split    {name}: {s['samples']} samples in {s['shards']} shards, {s['bytes'] / 1e6:.1f} MB{per}")
        norms = s["norms"]
        if norms:
            print(f"         token L2 norms over {norms['samples']} samples ({norms['skipped']} skipped):")
            for part, v in norms.items():
                if isinstance(v, dict):
                    print(f"           {part:13s} mean {v['mean']:9.3f}  std {v['std']:8.3f}  "
                          f"min {v['min']:9.3f}  max {v['max']:9.3f}")
    if r["problems"] is None:
        print("checksums not verified (--no-verify)")
    elif r["problems"]:
        print(f"checksums: {len(r['problems'])} shards failed:")
        for p in r["problems"][:20]:
            print(f"  {p['split']}/{p['file']}: {p['status']}")
    else:
        print("checksums: every shard matches the manifest")
