"""`data convert-chunks` on small fixture pickles in both prior formats (256 and 257 tokens), both task
directions; it refuses pickles without --trust-pickle and never touches its input."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

from blip3o_fast.cli import main
from blip3o_fast.data import EvalLoader, open_dataset, read_head

EVA_DIM, CLIP_DIM = 40, 24  # stand-ins for 4096 and 1024: the converter takes dims from the data


def make_prior(folder, tokens: int, shards=3, per_shard=4) -> dict:
    """The prior project's layout: embeddings_manifest.json (absolute paths of another machine) + pickles."""
    folder.mkdir(parents=True)
    cls = tokens == 257
    mode = "cls_patch" if cls else "patch_only"
    g = torch.Generator().manual_seed(tokens)
    entries, data = [], {}
    for s in range(shards):
        name = f"embeddings_shard_{s:05d}_{mode}.pkl"
        shard = {
            "eva_blip3o_embeddings": torch.randn(per_shard, tokens, EVA_DIM, generator=g),
            "clip_blip3o_embeddings": torch.randn(per_shard, tokens, CLIP_DIM, generator=g),
            "captions": [f"caption {s} {i}" for i in range(per_shard)],
            "keys": [f"{s:05d}{i:04d}" for i in range(per_shard)],
            "total_samples": per_shard, "shard_idx": s,
            "config": {"clip_model": "openai/clip-vit-large-patch14", "eva_model": "BAAI/EVA-CLIP-8B",
                       "tokens": tokens, "include_cls": cls},
        }
        with open(folder / name, "wb") as f:
            pickle.dump(shard, f, protocol=pickle.HIGHEST_PROTOCOL)
        entries.append({"shard_idx": s, "total_samples": per_shard, "success": True,
                        "output_path": f"/scratch-shared/someone/embeddings/{name}"})
        data[s] = shard
    (folder / "embeddings_manifest.json").write_text(json.dumps({
        "total_shards": shards, "total_samples": shards * per_shard, "tokens_per_sample": tokens,
        "include_cls": cls, "shards": entries, "format_version": f"blip3o_{tokens}_tokens_{mode}_v6"}))
    return data


def _snapshot(folder) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("tokens, task", [(256, "eva_to_clip"), (257, "clip_to_eva")])
def test_convert_both_formats_and_directions(tmp_path, tokens, task):
    src, out = tmp_path / "prior", tmp_path / "out"
    data = make_prior(src, tokens)
    before = _snapshot(src)
    assert main(["data", "convert-chunks", "--src", str(src), "--out", str(out), "--trust-pickle", "--task", task,
                 "--shard-size", "5", "--eval-shards", "1", "--quiet"]) == 0
    assert _snapshot(src) == before, "the input is only read"
    ds = open_dataset(out)
    cond_dim, target_dim = (EVA_DIM, CLIP_DIM) if task == "eva_to_clip" else (CLIP_DIM, EVA_DIM)
    assert (ds.task, ds.grid, ds.cond_dim, ds.target_dim) == (task, (16, 16), cond_dim, target_dim)
    assert ds.cond_tokens == ds.target_tokens == tokens and ds.cond_cls == ds.target_cls == (tokens == 257)
    assert ds.split_samples("train") == 8 and ds.split_samples("eval") == 4
    assert [s.samples for s in ds.shards("train")] == [5, 3]
    assert ds.manifest["streams"]["cond"]["name"] == ("eva_clip" if task == "eva_to_clip" else "clip")
    _assert_train_stats(ds)
    cond_key, target_key = (("eva_blip3o_embeddings", "clip_blip3o_embeddings") if task == "eva_to_clip"
                            else ("clip_blip3o_embeddings", "eva_blip3o_embeddings"))
    for split, shards in (("train", (0, 1)), ("eval", (2,))):
        batch = next(iter(EvalLoader(ds, split, 16)))
        want = {f"{s:05d}{i:04d}": (s, i) for s in shards for i in range(4)}
        assert batch["key"] == list(want)
        for j, (s, i) in enumerate(want.values()):
            assert batch["cond"].dtype == torch.float16
            assert torch.equal(batch["cond"][j], data[s][cond_key][i].half())
            assert torch.equal(batch["target"][j], data[s][target_key][i].half())
            assert batch["captions"][j] == [f"caption {s} {i}"]


def test_refuses_pickles_without_trust(tmp_path, capsys):
    src = tmp_path / "prior"
    make_prior(src, 256, shards=1)
    assert main(["data", "convert-chunks", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "loading a pickle runs whatever code it names" in err and "--trust-pickle" in err
    assert not (tmp_path / "out").exists()
    assert main(["data", "convert-chunks", "--src", str(src), "--out", str(src), "--trust-pickle"]) == 2
    assert "--out must differ from --src" in capsys.readouterr().err
    assert main(["data", "convert-chunks", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--trust-pickle"]) == 2
    assert "has no embeddings_manifest.json" in capsys.readouterr().err


def test_convert_embeds_captions_with_a_clip_model(tmp_path):
    from test_data_extract import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip", hidden=CLIP_DIM)
    src, out = tmp_path / "prior", tmp_path / "out"
    make_prior(src, 257, shards=1)
    assert main(["data", "convert-chunks", "--src", str(src), "--out", str(out), "--trust-pickle",
                 "--clip-model", clip, "--quiet"]) == 0
    ds = open_dataset(out)
    assert ds.text_dim == 16 and ds.max_captions == 1
    assert read_head(out).tensors["visual_projection.weight"].shape == (16, 24)
    batch = next(iter(EvalLoader(ds, "train", 8)))
    assert batch["text"].shape == (4, 1, 16) and batch["text_mask"].all()
    assert np.isfinite(batch["text"].float().numpy()).all() and batch["text"].float().norm(dim=-1).min() > 0


def test_eval_fraction_is_a_stable_hash_of_the_key_and_fits_the_readme_config(tmp_path, capsys):
    """The README's convert line: 256-token chunks with --eval-fraction, trained with eva_to_clip_base and the
    256-token overrides it names (without them the first check of the dataset fails)."""
    from blip3o_fast.config import load_config
    from blip3o_fast.data import check_compatible
    from blip3o_fast.data.format import DataError
    from blip3o_fast.data.split import held_out

    src, out = tmp_path / "prior", tmp_path / "out"
    make_prior(src, 256, shards=3, per_shard=8)
    args = ["data", "convert-chunks", "--src", str(src), "--out", str(out), "--trust-pickle", "--quiet"]
    assert main([*args, "--eval-fraction", "0.25"]) == 0
    ds = open_dataset(out)
    keys = [f"{s:05d}{i:04d}" for s in range(3) for i in range(8)]
    held = [k for k in keys if held_out(k, 0.25)]
    assert 0 < len(held) < len(keys) and ds.split_samples("eval") == len(held)
    assert [k for b in EvalLoader(ds, "eval", 64) for k in b["key"]] == held
    assert [k for b in EvalLoader(ds, "train", 64) for k in b["key"]] == [k for k in keys if k not in held]
    dims = [f"task.cond_dim={EVA_DIM}", f"task.target_dim={CLIP_DIM}"]
    check_compatible(ds, load_config("eva_to_clip_base", [*dims, "task.target_cls=false", "flow.head=mean"]).task)
    with pytest.raises(DataError, match="task.target_cls=true but the dataset's target stream has cls false"):
        check_compatible(ds, load_config("eva_to_clip_base", dims).task)
    capsys.readouterr()
    assert main([*args, "--overwrite", "--eval-shards", "1", "--eval-fraction", "0.1"]) == 2
    assert "--eval-shards and --eval-fraction both choose the eval split" in capsys.readouterr().err


def _assert_train_stats(ds) -> None:
    """stats.safetensors: accumulated while writing, equal to a reading pass over the train split only."""
    from blip3o_fast.data import read_stats
    from blip3o_fast.data.stats import compute_stats

    assert ds.manifest["stats"] == "stats.safetensors"
    written, read = read_stats(ds.path), compute_stats(ds, "train", progress=False)
    assert written.samples == read.samples == ds.split_samples("train")
    for name, value in written.tensors().items():
        torch.testing.assert_close(value, read.tensors()[name], rtol=1e-9, atol=1e-9)
