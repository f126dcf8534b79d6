"""`data inspect`: the summary, checksum verification and token-norm statistics."""

from __future__ import annotations

import json

from test_data_format import write_dataset

from blip3o_fast.cli import main


def test_inspect_reports_and_verifies(tmp_path, capsys):
    write_dataset(tmp_path, {"train": 20, "eval": 5}, shard_size=10)
    assert main(["data", "inspect", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train: 20 samples in 2 shards" in out and "every shard matches the manifest" in out
    assert "target cls" in out and "cond patch" in out

    shard = tmp_path / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # one flipped bit inside a payload: still a readable tar
    shard.write_bytes(bytes(data))
    assert main(["data", "inspect", str(tmp_path), "--quiet", "--json", "--samples", "7"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == [{"split": "train", "file": "train-000001.tar", "status": "sha256 mismatch"}]
    norms = report["splits"]["eval"]["norms"]
    assert norms["samples"] == 5 and set(norms) >= {"cond patch", "target patch", "target cls", "text"}
    assert report["splits"]["train"]["norms"]["samples"] == 7
    assert 2.0 < norms["cond patch"]["mean"] < 5.0  # 12 unit normals: about sqrt(12)

    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 2


def test_inspect_shows_the_channel_spread_of_the_statistics(tmp_path, capsys):
    from blip3o_fast.data.synth import SynthSpec, write_synth

    write_synth(tmp_path, SynthSpec(train_samples=32, eval_samples=8, shard_size=16, outlier_channels=2),
                progress=False)
    assert main(["data", "inspect", str(tmp_path), "--quiet", "--json", "--samples", "4"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["split"] == "train" and stats["samples"] == 32
    for stream in ("cond", "target"):  # two outlier channels: the largest std is far above the median
        assert stats[stream]["std_max"] > 8 * stats[stream]["std_median"]
    (tmp_path / "stats.safetensors").unlink()
    assert main(["data", "inspect", str(tmp_path), "--quiet", "--no-verify", "--samples", "0"]) == 0
    assert "stats    none (flow.target_norm needs them: blip3o-fast data stats DATASET)" in capsys.readouterr().out
