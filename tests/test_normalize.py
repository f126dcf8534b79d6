"""The normalised data space (docs/architecture.md §3.1.1) end to end: training on outlier-channel data with
flow.target_norm/cond_norm, evaluation and FeatureGenerator in the data's units, exports carrying the statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_export import cli
from test_train import run_train

from blip3o_fast.data.synth import SynthSpec, write_synth

NORM = ("flow.target_norm=channel", "flow.cond_norm=channel")


@pytest.fixture(scope="module")
def outlier_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("norm") / "synth"
    write_synth(out, SynthSpec(train_samples=192, eval_samples=48, shard_size=48, outlier_channels=3), progress=False)
    return out


@pytest.fixture(scope="module")
def normalised_run(outlier_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("norm-run") / "run"
    run_train(outlier_data, run, 30, *NORM, "train.ckpt_every=30")
    return run


def test_generated_features_are_in_the_data_units_and_exports_carry_the_statistics(
        outlier_data, normalised_run, tmp_path):
    from blip3o_fast import FeatureGenerator
    from blip3o_fast.data import read_stats

    out = tmp_path / "model"
    cli("export", str(normalised_run), "--out", str(out))
    assert (out / "stats.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["flow"] == {"head": "cls", "target_norm": "channel",
                                                                      "cond_norm": "channel"}
    stats = read_stats(outlier_data)
    for name, a in read_stats(out).tensors().items():
        assert torch.equal(a, stats.tensors()[name]), name
    from_run = FeatureGenerator.from_pretrained(normalised_run, device="cpu")
    from_export = FeatureGenerator.from_pretrained(out, device="cpu")
    g = torch.Generator().manual_seed(0)
    # conditions in the data's units: the outlier channels as large as in the dataset
    cond = stats.cond_mean.float() + stats.cond_std.float() * torch.randn(8, 64, 64, generator=g)
    feats = from_run.generate(cond, steps=4, seed=1)
    assert torch.equal(feats, from_export.generate(cond, steps=4, seed=1))
    # de-normalised: the three outlier channels carry the dataset's spread, not the unit scale the flow runs at
    spread = feats.flatten(0, 1).std(0)
    outliers = stats.target_std.topk(3).indices
    rest = torch.ones_like(spread, dtype=torch.bool)
    rest[outliers] = False
    assert float(spread[outliers].min()) > 8 * float(spread[rest].max())
    mean = feats.flatten(0, 1).mean(0)
    assert torch.allclose(mean[outliers], stats.target_mean[outliers].float(), atol=float(stats.target_std.max()))


def test_evaluation_reports_in_the_data_units(outlier_data, normalised_run, tmp_path):
    result = cli("eval", "--run", str(normalised_run), "--steps", "4", "--out", str(tmp_path))
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    patch = report["metrics"]["patch_cosine"]
    # de-normalised, the samples (and the sampler's start) carry the outlier channels' offsets and spread, which
    # dominate the true tokens' direction; normalised N(0, 1)-scale tokens would score near 0 against them
    assert patch["chance"] > 0.3 and patch["model"] > 0.3, result.stdout


def test_a_mode_without_statistics_is_one_line(outlier_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(outlier_data, copy)
    (copy / "stats.safetensors").unlink()
    result = run_train(copy, tmp_path / "run", 2, *NORM, check=False)
    assert result.returncode == 2
    assert "flow.target_norm=channel needs the dataset's statistics" in result.stderr.strip().splitlines()[-1]
    # a damaged statistics file does not matter to a run that does not normalise: it is not read
    (copy / "stats.safetensors").write_bytes(b"not safetensors")
    run_train(copy, tmp_path / "plain", 2)


def test_eval_on_other_data_keeps_the_training_normalisation(outlier_data, normalised_run, tmp_path):
    """`eval --run --data OTHER`: the model's normalisation is its training data's, not OTHER's statistics."""
    import shutil

    from blip3o_fast.data import read_stats, save_stats

    other = tmp_path / "other-data"
    shutil.copytree(outlier_data, other)
    stats = read_stats(other)
    save_stats(other, type(stats)(stats.cond_mean + 5, stats.cond_std * 3, stats.target_mean - 5,
                                  stats.target_std * 3, stats.samples))
    reports = {}
    for name, data in (("same", outlier_data), ("other", other)):
        out = tmp_path / f"report-{name}"
        cli("eval", "--run", str(normalised_run), "--data", str(data), "--steps", "2", "--out", str(out))
        reports[name] = json.loads(next(out.glob("*.json")).read_text())["metrics"]
    assert reports["same"] == reports["other"]
