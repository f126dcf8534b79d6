"""The dataset format: manifest validation, the Dataset view, compatibility with a task, the head file,
the writer's checks and the finite test. Also holds `write_dataset`, the small-dataset helper of the
other data tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from blip3o_fast.config import TaskConfig
from blip3o_fast.data import DataError, StreamSpec, TextSpec, check_compatible, open_dataset, read_head, save_head
from blip3o_fast.data.tario import all_finite, index_shard
from blip3o_fast.data.writer import ShardSetWriter, save_manifest, sha256_file
from blip3o_fast.errors import UserError

COND = StreamSpec("eva_clip", "test", 12, 4, False)
TARGET = StreamSpec("clip", "test", 8, 5, True)
TEXT = TextSpec(6, 3)


def sample_arrays(i: int) -> dict:
    """The deterministic content of sample i (what write_dataset writes)."""
    rng = np.random.default_rng(i)
    return {"cond": rng.standard_normal((4, 12)).astype(np.float16),
            "target": rng.standard_normal((5, 8)).astype(np.float16),
            "text": rng.standard_normal((1 + i % 3, 6)).astype(np.float16),
            "captions": [f"caption {c} of {i}" for c in range(1 + i % 3)]}


def write_dataset(folder, splits=None, shard_size=10, text=True, task="eva_to_clip") -> dict[str, list[str]]:
    """A small dataset (grid 2x2, cond [4, 12], target [5, 8] with CLS, text [1..3, 6]); returns keys per split."""
    splits = splits or {"train": 40, "eval": 13}
    keys, records, start = {}, {}, 0
    for split, n in splits.items():
        with ShardSetWriter(folder, split, COND, TARGET, TEXT if text else None, shard_size=shard_size) as w:
            for i in range(start, start + n):
                a = sample_arrays(i)
                assert w.write(f"s{i:05d}", a["cond"], a["target"], a["text"] if text else None, a["captions"])
        keys[split] = [f"s{i:05d}" for i in range(start, start + n)]
        records[split] = w.records
        start += n
    save_manifest(folder, task, (2, 2), COND, TARGET, TEXT if text else None, records)
    return keys


def test_open_dataset_reads_the_manifest(tmp_path):
    write_dataset(tmp_path)
    ds = open_dataset(tmp_path)
    assert (ds.cond_dim, ds.target_dim, ds.cond_tokens, ds.target_tokens) == (12, 8, 4, 5)
    assert (ds.grid, ds.cond_cls, ds.target_cls, ds.text_dim, ds.max_captions) == ((2, 2), False, True, 6, 3)
    assert ds.split_names() == ["train", "eval"] and ds.split_samples("train") == 40
    shards = ds.shards("train")
    assert [s.samples for s in shards] == [10, 10, 10, 10]
    assert all(sha256_file(s.path) == s.sha256 for s in shards)
    m = ds.manifest
    assert m["format_version"] == 1 and m["task"] == "eva_to_clip" and m["grid"] == [2, 2]
    assert m["streams"]["target"] == {"name": "clip", "model": "test", "dim": 8, "tokens": 5, "cls": True,
                                      "dtype": "float16", "storage": "float"}
    assert m["text"]["dim"] == 6 and m["splits"]["eval"]["samples"] == 13
    with pytest.raises(DataError, match="has no split 'valid'.*train, eval"):
        ds.split_samples("valid")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("streams"), "has no 'streams'"),
    (lambda m: m.update(format_version=7), "format_version 7"),
    (lambda m: m["streams"]["cond"].update(tokens=5), "streams.cond has 5 tokens but grid"),
    (lambda m: m["streams"]["target"].update(dim=0), "streams.target.dim must be an integer >= 1"),
    (lambda m: m["streams"]["cond"].update(dtype="int8"), "dtype must be one of"),
    (lambda m: m["splits"]["train"].update(samples=3), "splits.train.samples is 3"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="../x.tar"), "plain file name"),
])
def test_malformed_manifest_is_a_one_line_user_error(tmp_path, edit, message):
    write_dataset(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message) as e:
        open_dataset(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_folder_manifest_or_json(tmp_path):
    with pytest.raises(UserError, match="does not exist: run `blip3o-fast data synth"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(UserError, match="has no manifest.json"):
        open_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        open_dataset(tmp_path)


def test_check_compatible_names_the_field_both_values_and_the_fix(tmp_path):
    write_dataset(tmp_path)
    ds = open_dataset(tmp_path)
    ok = TaskConfig(cond_dim=12, target_dim=8, grid=(2, 2), target_cls=True)
    check_compatible(ds, ok)
    cases = [
        (dict(cond_dim=4096), "task.cond_dim=4096 but the dataset's cond stream has dim 12: set task.cond_dim=12 or "
                              "point data.path at"),
        (dict(target_dim=1024), "task.target_dim=1024 but the dataset's target stream has dim 8: set "
                                "task.target_dim=8"),
        (dict(grid=(16, 16)), r"task.grid=\[16, 16\] but the dataset's grid is \[2, 2\]"),
        (dict(target_cls=False), "task.target_cls=false but the dataset's target stream has cls true: set "
                                 "task.target_cls=true"),
        (dict(name="clip_to_eva"), "task.name=clip_to_eva but the dataset was made for eva_to_clip"),
    ]
    for change, message in cases:
        task = TaskConfig(**{**dict(cond_dim=12, target_dim=8, grid=(2, 2), target_cls=True), **change})
        with pytest.raises(UserError, match=message) as e:
            check_compatible(ds, task)
        assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_head_round_trip_and_checks(tmp_path):
    g = torch.Generator().manual_seed(0)
    w, b, p = torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(6, 8, generator=g)
    save_head(tmp_path, w, b, p, 1e-5)
    head = read_head(tmp_path).tensors
    assert set(head) == {"post_layernorm.weight", "post_layernorm.bias", "visual_projection.weight"}
    assert torch.equal(head["visual_projection.weight"], p) and head["post_layernorm.bias"].dtype == torch.float32
    assert read_head(tmp_path).layer_norm_eps == 1e-5
    assert read_head(tmp_path / "elsewhere") is None
    with pytest.raises(UserError, match="do not fit"):
        save_head(tmp_path, w, b, torch.randn(6, 7))
    write_dataset(tmp_path)  # target dim 8 matches this head
    assert read_head(open_dataset(tmp_path).path, target_dim=8).token_dim == 8
    with pytest.raises(UserError, match="head input dim 8 != target dim 9"):
        read_head(tmp_path, target_dim=9)
    save_file({"proj": torch.zeros(2, 2)}, tmp_path / "head.safetensors")
    with pytest.raises(UserError, match="must hold exactly post_layernorm.weight"):
        read_head(tmp_path)
    (tmp_path / "head.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable safetensors"):
        read_head(tmp_path)


def test_writer_skips_bad_samples_and_hashes_what_it_wrote(tmp_path):
    with ShardSetWriter(tmp_path, "train", COND, TARGET, TEXT, shard_size=3) as w:
        good = sample_arrays(0)
        assert w.write("a.b/c", good["cond"], good["target"], good["text"])
        assert not w.write("nan", np.full((4, 12), np.nan), good["target"], good["text"])
        assert not w.write("big", np.full((4, 12), 1e6), good["target"], good["text"])  # inf in float16
        assert not w.write("shape", good["cond"][:3], good["target"], good["text"])
        assert not w.write("text", good["cond"], good["target"], np.zeros((4, 6)))  # more than max_captions
        for i in range(4):
            assert w.write(f"k{i}", good["cond"], good["target"], None)  # no captions: 0 text rows
    assert w.stats.skipped_samples == 4 and w.stats.reasons == {"non-finite": 2, "bad shape": 2}
    assert [r["samples"] for r in w.records] == [3, 2]
    assert not list(tmp_path.glob("*.partial"))
    for r in w.records:
        assert sha256_file(tmp_path / r["file"]) == r["sha256"]
    save_manifest(tmp_path, "eva_to_clip", (2, 2), COND, TARGET, TEXT, {"train": w.records})
    from blip3o_fast.data import EvalLoader

    batch = next(iter(EvalLoader(open_dataset(tmp_path), "train", 8)))
    assert batch["key"][0] == "a_b_c" and batch["text_mask"].sum(1).tolist() == [1, 0, 0, 0, 0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=64), st.sampled_from([np.float16, np.float32]))
def test_all_finite_matches_numpy(bits, dtype):
    if dtype == np.float32:
        x = (np.array(bits, np.uint32) * 65537).astype(np.uint32).view(np.float32)
    else:
        x = np.array(bits, np.uint16).view(np.float16)
    assert all_finite(x) == bool(np.isfinite(x).all())
    for special in (np.inf, -np.inf, np.nan, -np.nan):
        y = x.copy()
        y[len(y) // 2] = special
        assert not all_finite(y)


def test_shard_index_is_cached_until_the_file_changes(tmp_path):
    write_dataset(tmp_path, {"train": 6}, shard_size=10)
    shard = next(tmp_path.glob("train-*.tar"))
    first = index_shard(shard)
    assert index_shard(shard) is first and len(first.samples) == 6
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated: another size, so scanned again
    again = index_shard(shard)
    assert again is not first and again.error is not None and len(again.samples) < 6
    shard.unlink()
    assert index_shard(shard).error == "missing shard file"
