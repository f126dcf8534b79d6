"""int8 storage (docs/architecture.md §3.9.6): the round trip's error bound, old manifests, damaged scales and
out-of-range values as counted skips, the CPU and the pass-through (dequantised after the copy) paths."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import DEVICES
from test_export import cli
from test_train import run_train, small_data  # noqa: F401  (session fixture)

from blip3o_fast.data import EvalLoader, StreamSpec, TextSpec, TrainLoader, open_dataset
from blip3o_fast.data.quant import QMAX, dequantize, quantize, to_device
from blip3o_fast.data.writer import ShardSetWriter, save_manifest

COND = StreamSpec("eva_clip", "test", 12, 4, False)
TARGET = StreamSpec("clip", "test", 8, 5, True)
TEXT = TextSpec(6, 3)


def _arrays(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    cond = rng.standard_normal((4, 12)).astype(np.float16)
    cond[:, 3] *= 40  # an outlier channel, as CLIP's
    return cond, rng.standard_normal((5, 8)).astype(np.float16)


def write_int8(folder, n=12, cond=None, target=None, shard_size=6) -> list[str]:
    cond = cond or replace(COND, storage="int8", scale="token")
    target = target or TARGET
    with ShardSetWriter(folder, "train", cond, target, TEXT, shard_size=shard_size) as w:
        for i in range(n):
            c, t = _arrays(i)
            assert w.write(f"s{i:03d}", c, t, np.ones((1, 6)), [f"cap {i}"])
    save_manifest(folder, "eva_to_clip", (2, 2), cond, target, TEXT, {"train": w.records},
                  stats=w.channel_stats())
    return [f"s{i:03d}" for i in range(n)]


@pytest.mark.parametrize("per", ["token", "channel"])
def test_round_trip_error_is_within_half_a_step(per):
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32) * np.linspace(0.1, 50, 64)
    q, scale = quantize(x, per)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and q.min() >= -QMAX
    assert scale.shape == ((16, 1) if per == "token" else (1, 64))
    back = dequantize(torch.from_numpy(q), torch.from_numpy(scale), torch.float32).numpy()
    assert np.all(np.abs(back - x) <= scale / 2 * (1 + 1e-5))
    axis = 1 if per == "token" else 0
    assert np.allclose(np.abs(back).max(axis), np.abs(x).max(axis), rtol=1e-6)  # the absmax is +-127 steps


def test_zero_token_gets_a_valid_scale():
    q, scale = quantize(np.zeros((2, 3)))
    assert (q == 0).all() and (scale == 1).all()


def test_int8_dataset_reads_close_to_the_float16_values(tmp_path):
    keys = write_int8(tmp_path)
    ds = open_dataset(tmp_path)
    assert ds.cond.int8 and ds.cond.scale == "token" and not ds.target.int8
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["streams"]["cond"]["storage"] == "int8" and manifest["streams"]["target"]["storage"] == "float"
    batch = next(iter(EvalLoader(ds, "train", 12)))
    assert batch["key"] == keys and batch["cond"].dtype == torch.float16 and "cond_scale" not in batch
    for i in range(12):
        c, t = _arrays(i)
        step = np.abs(c.astype(np.float32)).max(1, keepdims=True) / QMAX
        assert np.all(np.abs(batch["cond"][i].float().numpy() - c) <= step / 2 + 1e-2 * np.abs(c))
        assert torch.equal(batch["target"][i], torch.from_numpy(t))  # float storage: bit for bit


@pytest.mark.parametrize("device", DEVICES)
def test_pass_through_dequantises_after_the_copy_to_the_same_values(tmp_path, device):
    write_int8(tmp_path, target=replace(TARGET, storage="int8"))  # the default scale: per channel
    reader = next(iter(EvalLoader(open_dataset(tmp_path), "train", 12)))
    ds = open_dataset(tmp_path)
    ds.dequantize = "device"
    raw = next(iter(EvalLoader(ds, "train", 12)))
    assert raw["cond"].dtype == torch.int8 and raw["cond_scale"].shape == (12, 4, 1)
    assert raw["target"].dtype == torch.int8 and raw["target_scale"].shape == (12, 1, 8)
    for name in ("cond", "target"):
        on_device = to_device(raw, name, torch.device(device), torch.float16)
        assert on_device.device.type == device and torch.equal(on_device.cpu(), reader[name])
    train = next(iter(TrainLoader(ds, "train", 4, seed=0, shuffle_buffer=0)))
    assert train["cond"].dtype == torch.int8 and "cond_scale" in train


def test_old_manifest_without_storage_reads_as_float(tmp_path):
    with ShardSetWriter(tmp_path, "train", COND, TARGET, None, shard_size=4) as w:
        for i in range(4):
            assert w.write(f"s{i}", *_arrays(i))
    save_manifest(tmp_path, "eva_to_clip", (2, 2), COND, TARGET, None, {"train": w.records})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for stream in manifest["streams"].values():
        del stream["storage"]  # as written before int8 storage existed
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ds = open_dataset(tmp_path)
    assert ds.cond.storage == "float" and not ds.cond.int8
    batch = next(iter(EvalLoader(ds, "train", 4)))
    assert torch.equal(batch["cond"][1], torch.from_numpy(_arrays(1)[0]))


def _damage(folder, shard: str, damage: dict) -> None:
    """Rewrites one shard with some samples' members replaced: {key: {ext: array}}."""
    path = folder / shard
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    with wds.TarWriter(str(path)) as out:
        for s in samples:
            s = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            s.update(damage.get(s["__key__"], {}))
            out.write(s)


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_scale_and_minus_128_are_counted_skips(tmp_path, workers):
    write_int8(tmp_path)
    shard = open_dataset(tmp_path).shards("train")[0].file
    q, scale = quantize(_arrays(0)[0], "token")
    low = q.copy()
    low[1, 2] = -128
    damage = {"s000": {"cond.scale.npy": np.where(np.arange(4)[:, None] == 2, np.nan, scale).astype(np.float32)},
              "s001": {"cond.scale.npy": np.zeros_like(scale)},
              "s002": {"cond.scale.npy": np.full_like(scale, np.inf)},
              "s003": {"cond.npy": low},
              "s004": {"cond.scale.npy": np.full_like(scale, 1e6)},  # finite, but 127 x it is inf in float16
              "s005": {"cond.scale.npy": scale.astype(np.float16)}}
    _damage(tmp_path, shard, damage)
    loader = EvalLoader(open_dataset(tmp_path), "train", 4, num_workers=workers)
    keys = [k for b in loader for k in b["key"]]
    assert keys == [f"s{i:03d}" for i in range(6, 12)]
    stats = loader.stats()
    assert stats["reasons"] == {"bad scale": 4, "out of range": 1, "bad dtype": 1}


def test_writer_records_int8_statistics_of_the_values_read_back(tmp_path):
    write_int8(tmp_path)
    from blip3o_fast.data import read_stats

    stats = read_stats(tmp_path, 12, 8)
    values = np.concatenate([b["cond"].float().numpy().reshape(-1, 12)
                             for b in EvalLoader(open_dataset(tmp_path), "train", 12)])
    assert np.allclose(stats.cond_mean.numpy(), values.mean(0), atol=1e-4)


def test_trainer_dequantises_passed_through_int8_to_the_reader_values(tmp_path):
    from types import SimpleNamespace

    from blip3o_fast.engine.trainer import Trainer

    write_int8(tmp_path, target=replace(TARGET, storage="int8"))
    reader = next(iter(EvalLoader(open_dataset(tmp_path), "train", 12)))
    ds = open_dataset(tmp_path)
    ds.dequantize = "device"
    raw = next(iter(EvalLoader(ds, "train", 12)))
    fake = SimpleNamespace(device=torch.device("cpu"), norm=SimpleNamespace(active=False), dtype=torch.float32)
    for got, want in zip(Trainer._inputs(fake, raw), Trainer._inputs(fake, reader)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def _files(folder) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_convert_then_train_evaluate_generate_and_inspect_an_int8_dataset(small_data, tmp_path):  # noqa: F811
    before = _files(small_data)
    out = tmp_path / "int8"
    result = cli("data", "convert", "--src", str(small_data), "--out", str(out), "--storage", "int8", "--quiet")
    assert "wrote" in result.stdout and _files(small_data) == before  # the input is only read
    src, dst = open_dataset(small_data), open_dataset(out)
    assert dst.cond.int8 and not dst.target.int8 and dst.split_names() == src.split_names()
    assert (out / "head.safetensors").read_bytes() == (small_data / "head.safetensors").read_bytes()
    assert (out / "stats.safetensors").is_file()
    for split in src.split_names():
        a, b = (list(EvalLoader(d, split, 64)) for d in (src, dst))
        assert [k for x in a for k in x["key"]] == [k for x in b for k in x["key"]]
        assert [c for x in a for c in x["captions"]] == [c for x in b for c in x["captions"]]
        for x, y in zip(a, b):
            assert torch.equal(x["target"], y["target"]) and torch.equal(x["text"], y["text"])
            err = (x["cond"].float() - y["cond"].float()).norm() / x["cond"].float().norm()
            assert 0 < err < 0.01
    shown = cli("data", "inspect", str(out), "--samples", "8").stdout
    assert "int8 + float32 scale per channel" in shown and "kB per sample" in shown
    back = tmp_path / "float16"  # and back: float16 members holding exactly what the int8 dataset reads as
    cli("data", "convert", "--src", str(out), "--out", str(back), "--storage", "float16", "--quiet")
    x, y = (next(iter(EvalLoader(open_dataset(d), "eval", 64))) for d in (out, back))
    assert not open_dataset(back).cond.int8 and torch.equal(x["cond"], y["cond"])
    written = _files(out)
    again = cli("data", "convert", "--src", str(out), "--out", str(out), "--overwrite", check=False)
    assert again.returncode == 2 and "never modifies" in again.stderr and _files(out) == written

    run = tmp_path / "run"
    run_train(out, run, 4, "train.eval_every=4", "train.eval_samples=8", "eval.steps=1", "eval.batch_size=8")
    assert (run / "eval").is_dir()
    cli("eval", "--model", str(run), "--data", str(out), "--steps", "1", "--max-samples", "8")
    gen = tmp_path / "gen"
    cli("generate", "--model", str(run), "--data", str(out), "--split", "eval", "--out", str(gen), "--steps", "1")
    made = open_dataset(gen)
    assert made.cond.int8 and made.split_samples("eval") == src.split_samples("eval")
    assert "int8" in cli("data", "inspect", str(gen), "--samples", "8").stdout
