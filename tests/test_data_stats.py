"""Normalisation statistics (docs/architecture.md §3.9.5, §3.1.1): the streaming accumulator, stats.safetensors from
the producers and `data stats`, synth's outlier channels, and the flow's normalisation built from them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train import ROOT, env

from blip3o_fast.config import FlowConfig
from blip3o_fast.data import DataError, EvalLoader, open_dataset, read_stats
from blip3o_fast.data.stats import ChannelStats, compute_stats
from blip3o_fast.data.synth import SynthSpec, write_synth
from blip3o_fast.errors import UserError
from blip3o_fast.model.normalize import FlowNorm


@pytest.fixture(scope="module")
def outlier_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "synth"
    write_synth(out, SynthSpec(train_samples=96, eval_samples=32, shard_size=32, outlier_channels=3), progress=False)
    return out


def _split_arrays(dataset, split):
    rows = {"cond": [], "target": []}
    for batch in EvalLoader(dataset, split, 16):
        for k in rows:
            rows[k].append(batch[k].double().flatten(0, 1))
    return {k: torch.cat(v) for k, v in rows.items()}


def test_channel_stats_merges_pieces_exactly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 6)) * np.array([1, 10, 100, 1e-3, 5, 1]) + np.array([0, 1e3, -5, 2, 0, 7])
    acc = ChannelStats(6)
    for piece in np.split(x, [1, 3, 400, 401, 999]):  # uneven pieces, one of them a single row
        acc.add(piece)
    acc.add(np.zeros((0, 6)))
    assert acc.count == 1000
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.std, x.std(0), rtol=1e-10)


def test_synth_writes_the_train_split_statistics(outlier_data):
    dataset = open_dataset(outlier_data)
    assert dataset.manifest["stats"] == "stats.safetensors"
    stats = read_stats(outlier_data, dataset.cond_dim, dataset.target_dim)
    train, held_out = _split_arrays(dataset, "train"), _split_arrays(dataset, "eval")
    assert stats.samples == 96 and stats.split == "train"
    for name, mean, std in (("cond", stats.cond_mean, stats.cond_std), ("target", stats.target_mean, stats.target_std)):
        torch.testing.assert_close(mean, train[name].mean(0), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(std, train[name].std(0, correction=0), rtol=1e-9, atol=1e-9)
        both = torch.cat([train[name], held_out[name]])
        assert not torch.allclose(mean, both.mean(0), rtol=1e-6, atol=1e-6), "the held-out split must stay out"
    # three outlier channels per stream, tens of times the others' spread
    for std in (stats.cond_std, stats.target_std):
        top = std.sort(descending=True).values
        assert top[2] > 8 * top[3:].max()


def test_data_stats_command_recomputes_them(outlier_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(outlier_data, copy)
    (copy / "stats.safetensors").unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("stats")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "-m", "blip3o_fast.cli", "data", "stats", str(copy), "--quiet"],
                            capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "96 samples of split 'train'" in result.stdout
    assert json.loads((copy / "manifest.json").read_text())["stats"] == "stats.safetensors"
    ours, theirs = read_stats(copy), read_stats(outlier_data)
    for a, b in zip(ours.tensors().values(), theirs.tensors().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # same values, another order of accumulation


def test_channel_norm_makes_every_channel_unit_scale(outlier_data):
    dataset = open_dataset(outlier_data)
    stats = read_stats(outlier_data)
    train = _split_arrays(dataset, "train")
    for mode in ("channel", "global"):
        norm = FlowNorm(FlowConfig(target_norm=mode, cond_norm=mode), stats.tensors())
        for name, stream in (("target", norm.target), ("cond", norm.cond)):
            x = stream(train[name])
            if mode == "channel":
                torch.testing.assert_close(x.mean(0), torch.zeros_like(x.mean(0)), atol=1e-9, rtol=0)
                torch.testing.assert_close(x.std(0, correction=0), torch.ones_like(x.mean(0)), atol=1e-9, rtol=0)
            else:  # one scalar pair: unit scale overall, the outlier channels still stand out
                assert abs(float(x.mean())) < 1e-9 and abs(float(x.std(correction=0)) - 1) < 1e-9
                spread = x.std(0)
                assert float(spread.max()) > 10 * float(spread.median())
            torch.testing.assert_close(stream.inverse(x), train[name], rtol=1e-12, atol=1e-9)
    none = FlowNorm(FlowConfig(), None)
    assert not none.active and none.target(train["target"]) is train["target"]


def test_missing_or_damaged_statistics_are_one_line_errors(outlier_data, tmp_path):
    with pytest.raises(UserError, match="flow.target_norm=channel needs the dataset's statistics.*data stats"):
        FlowNorm(FlowConfig(target_norm="channel"), None)
    bad = tmp_path / "stats.safetensors"
    bad.write_bytes((outlier_data / "stats.safetensors").read_bytes()[:-40])
    with pytest.raises(DataError, match="not a readable safetensors file.*data stats"):
        read_stats(bad)
    with pytest.raises(DataError, match="not finite per-channel vectors of dim 7"):
        read_stats(outlier_data, cond_dim=7)


def test_compute_stats_counts_only_valid_samples(outlier_data):
    stats = compute_stats(open_dataset(outlier_data), "eval", progress=False)
    assert stats.samples == 32 and stats.split == "eval"
