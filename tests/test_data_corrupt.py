"""Corrupt input is skipped and counted, never fatal and never a silent early end: a truncated shard, a
missing shard, wrong shape, wrong dtype, NaN, a missing member and bad JSON."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from test_data_format import sample_arrays, write_dataset

from blip3o_fast.data import DataError, EvalLoader, TrainLoader, open_dataset
from blip3o_fast.data.writer import sha256_file

BAD = {  # key -> what is wrong, and the reason the reader counts
    "b_shape": "bad shape", "b_nan": "non-finite", "b_missing": "missing member", "b_dtype": "bad dtype",
    "b_json": "bad json", "b_text_inf": "non-finite",
}


def _bad_shard(path) -> int:
    """A shard of 2 good and 6 bad samples, written around the writer's checks."""
    good = sample_arrays(1000)
    enc = wds.writer.numpy_dumps
    samples = [{"__key__": "g_first", "cond.npy": enc(good["cond"]), "target.npy": enc(good["target"]),
                "text.npy": enc(good["text"]), "json": b'{"captions": ["ok"]}'}]
    for key in BAD:
        s = dict(samples[0], __key__=key)
        if key == "b_shape":
            s["cond.npy"] = enc(good["cond"][:, :11].copy())
        if key == "b_nan":
            t = good["target"].copy()
            t[2, 3] = np.nan
            s["target.npy"] = enc(t)
        if key == "b_missing":
            del s["target.npy"]
        if key == "b_dtype":
            s["cond.npy"] = enc(good["cond"].astype(np.float32))
        if key == "b_json":
            s["json"] = b"{oops"
        if key == "b_text_inf":
            t = good["text"].copy()
            t[0, 0] = -np.inf
            s["text.npy"] = enc(t)
        samples.append(s)
    samples.append(dict(samples[0], __key__="g_last"))
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)
    return len(samples)


@pytest.fixture()
def corrupt(tmp_path):
    keys = write_dataset(tmp_path, {"train": 30, "eval": 30}, shard_size=10)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for split in ("train", "eval"):
        n = _bad_shard(tmp_path / f"{split}-bad.tar")
        manifest["splits"][split]["shards"].append({"file": f"{split}-bad.tar", "samples": n,
                                                    "sha256": sha256_file(tmp_path / f"{split}-bad.tar")})
        manifest["splits"][split]["samples"] += n
        # cut the middle shard inside its 7th sample: 6 samples survive, 4 are lost
        shard = tmp_path / f"{split}-000001.tar"
        size = shard.stat().st_size
        with open(shard, "r+b") as f:
            f.truncate(int(size * 0.65))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return open_dataset(tmp_path), keys


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_skips_and_counts_everything_bad(corrupt, workers):
    ds, keys = corrupt
    loader = EvalLoader(ds, "eval", batch_size=4, num_workers=workers)
    seen = [k for b in loader for k in b["key"]]
    stats = loader.stats()
    lost = {k for k in keys["eval"][10:20]} - set(seen)
    assert 3 <= len(lost) <= 5 and set(seen) == set(keys["eval"]) - lost | {"g_first", "g_last"}
    assert stats["samples"] == len(seen)
    assert stats["skipped_shards"] == 1
    # nothing vanishes: read + skipped = every sample the manifest lists
    assert stats["samples"] + stats["skipped_samples"] == ds.split_samples("eval")
    reasons = stats["reasons"]
    assert reasons["bad shape"] == 1 and reasons["non-finite"] == 2 and reasons["bad dtype"] == 1
    assert reasons["bad json"] == 1
    # the sample cut in half fails its checks (a member is missing); the ones after it are lost with the shard
    assert reasons["lost with shard"] + reasons["missing member"] - 1 == len(lost)
    assert any("truncated" in k for k in reasons) and stats["examples"]


def test_training_skips_bad_input_and_keeps_going(corrupt):
    ds, keys = corrupt
    loader = TrainLoader(ds, "train", batch_size=4, seed=0, num_workers=2)
    batches = list(itertools.islice(loader, 30))  # about four epochs of the ~26 good samples
    seen = {k for b in batches for k in b["key"]}
    assert not seen & set(BAD) and {"g_first", "g_last"} <= seen
    for b in batches:
        assert torch.isfinite(b["cond"]).all() and torch.isfinite(b["target"]).all() and torch.isfinite(b["text"]).all()
    stats = loader.stats()
    assert stats["samples"] == 120 and stats["skipped_shards"] >= 2 and stats["reasons"]["non-finite"] >= 4


def test_missing_shard_is_counted_not_fatal(tmp_path):
    keys = write_dataset(tmp_path, {"eval": 30}, shard_size=10)
    os.remove(tmp_path / "eval-000000.tar")
    loader = EvalLoader(open_dataset(tmp_path), "eval", 8)
    seen = [k for b in loader for k in b["key"]]
    assert seen == keys["eval"][10:]
    stats = loader.stats()
    assert stats["skipped_shards"] == 1 and stats["skipped_samples"] == 10
    assert stats["reasons"] == {"missing shard file": 1, "lost with shard": 10}


def test_nothing_readable_is_a_clear_error(tmp_path):
    write_dataset(tmp_path, {"train": 20}, shard_size=10)
    for shard in tmp_path.glob("train-*.tar"):
        shard.write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="had no valid sample"):
        next(iter(TrainLoader(open_dataset(tmp_path), "train", 4, seed=0)))
    for shard in tmp_path.glob("train-*.tar"):
        shard.unlink()
    with pytest.raises(DataError, match="none of the 2 shard files"):
        TrainLoader(open_dataset(tmp_path), "train", 4, seed=0)
