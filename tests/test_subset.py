"""`data subset` and the overfit mode (docs/architecture.md §3.9.7): the first N samples of a split copied byte for
byte (float16 and int8), their own statistics, one-line errors that write nothing, and the shipped `overfit` config
memorising its samples through the CLI."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_export import cli

from blip3o_fast.cli import main
from blip3o_fast.config import load_config
from blip3o_fast.data import EvalLoader, open_dataset, read_stats
from blip3o_fast.data.synth import SynthSpec, write_synth
from blip3o_fast.data.tario import index_shard


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("subset") / "synth"
    write_synth(out, SynthSpec(train_samples=40, eval_samples=12, shard_size=16), progress=False)
    return out


@pytest.fixture(scope="module")
def source_int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("subset") / "int8"
    write_synth(out, SynthSpec(train_samples=24, eval_samples=0, shard_size=10, storage="int8",
                               storage_target="int8", int8_scale="token"), progress=False)
    return out


def _snapshot(folder) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir()) if p.is_file()}


def _members(folder, split: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {extension: stored bytes}) of every sample of a split, in manifest and tar order."""
    out = []
    for shard in open_dataset(folder).shards(split):
        with open(shard.path, "rb") as f:
            for sample in index_shard(shard.path).samples[:shard.samples]:
                members = {}
                for ext, (offset, size) in sample.members.items():
                    f.seek(offset)
                    members[ext] = f.read(size)
                out.append((sample.key, members))
    return out


def _read(folder, split: str) -> dict:
    batches = list(EvalLoader(open_dataset(folder), split, 7, pin_memory=False))
    return {"key": [k for b in batches for k in b["key"]], "captions": [c for b in batches for c in b["captions"]],
            "cond": torch.cat([b["cond"] for b in batches]), "target": torch.cat([b["target"] for b in batches])}


def subset(*args: str) -> int:
    return main(["data", "subset", *map(str, args), "--quiet"])


@pytest.mark.parametrize("split, n", [("train", 20), ("eval", 5)])
def test_subset_holds_the_first_n_samples_byte_for_byte(source, tmp_path, split, n):
    before = _snapshot(source)
    out = tmp_path / "sub"
    assert subset(source, "--out", out, "--samples", n, "--split", split) == 0  # 20 spans the first two shards
    assert _snapshot(source) == before, "the source is only read"
    ds = open_dataset(out)
    assert ds.split_names() == ["train"] and ds.split_samples("train") == n
    src_members, sub_members = _members(source, split)[:n], _members(out, "train")
    assert [k for k, _ in sub_members] == [k for k, _ in src_members]
    for (_, a), (_, b) in zip(src_members, sub_members):
        assert set(a) == set(b) == {"cond.npy", "target.npy", "text.npy", "json"} and a == b
    want, got = _read(source, split), _read(out, "train")
    assert got["key"] == want["key"][:n] and got["captions"] == want["captions"][:n]
    assert torch.equal(got["cond"], want["cond"][:n]) and torch.equal(got["target"], want["target"][:n])
    assert (out / "head.safetensors").read_bytes() == (source / "head.safetensors").read_bytes()
    src_ds = open_dataset(source)
    assert (ds.cond, ds.target, ds.text, ds.grid, ds.task) == (src_ds.cond, src_ds.target, src_ds.text,
                                                               src_ds.grid, src_ds.task)
    made = ds.manifest["created_by"]
    assert made["command"] == "blip3o-fast data subset" and made["source"] == str(source)
    assert (made["samples"], made["split"]) == (n, split)
    assert made["source_created_by"]["command"] == "blip3o-fast data synth"


def test_the_statistics_are_the_subsets(source, tmp_path):
    out = tmp_path / "sub"
    assert subset(source, "--out", out, "--samples", 6) == 0
    stats, whole = read_stats(out), read_stats(source)
    assert open_dataset(out).manifest["stats"] == "stats.safetensors" and stats.samples == 6
    mine = _read(source, "train")
    for name, mean, std in (("cond", stats.cond_mean, stats.cond_std), ("target", stats.target_mean,
                                                                          stats.target_std)):
        rows = mine[name][:6].double().reshape(-1, mean.numel())
        torch.testing.assert_close(mean, rows.mean(0), rtol=0, atol=1e-12)
        torch.testing.assert_close(std, rows.std(0, correction=0), rtol=0, atol=1e-12)
        assert (mean - getattr(whole, f"{name}_mean")).abs().max() > 1e-3, "not the source's statistics"


def test_int8_stays_int8_with_the_stored_values_and_scales(source_int8, tmp_path):
    out = tmp_path / "sub"
    assert subset(source_int8, "--out", out, "--samples", 13) == 0
    src, ds = open_dataset(source_int8), open_dataset(out)
    assert ds.cond.int8 and ds.target.int8 and ds.cond.scale == ds.target.scale == "token"
    assert ds.manifest["streams"] == src.manifest["streams"]
    a, b = _members(source_int8, "train")[:13], _members(out, "train")
    assert [m for _, m in a] == [m for _, m in b]
    assert {"cond.scale.npy", "target.scale.npy"} <= set(b[0][1])
    want, got = _read(source_int8, "train"), _read(out, "train")
    assert torch.equal(got["cond"], want["cond"][:13]) and torch.equal(got["target"], want["target"][:13])
    stats = read_stats(out)  # of the values as read back (dequantised)
    torch.testing.assert_close(stats.cond_mean, want["cond"][:13].double().reshape(-1, ds.cond_dim).mean(0),
                               rtol=0, atol=1e-12)


def _damage_cond(folder, position: int) -> str:
    """Sets one float16 of the condition of the train split's sample at `position` (first shard) to inf."""
    shard = open_dataset(folder).shards("train")[0]
    sample = index_shard(shard.path).samples[position]
    offset, size = sample.members["cond.npy"]
    data = bytearray(shard.path.read_bytes())
    data[offset + size - 2:offset + size] = np.array([np.inf], np.float16).tobytes()
    shard.path.write_bytes(bytes(data))
    return sample.key


def test_a_bad_sample_is_skipped_as_the_reader_skips_it(source, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    write_synth(damaged, SynthSpec(train_samples=8, eval_samples=0, shard_size=8), progress=False)
    bad = _damage_cond(damaged, 2)
    out = tmp_path / "sub"
    assert subset(damaged, "--out", out, "--samples", 7) == 0
    keys = _read(out, "train")["key"]
    assert bad not in keys and keys == _read(damaged, "train")["key"] and len(keys) == 7
    capsys.readouterr()
    assert subset(damaged, "--out", tmp_path / "more", "--samples", 8) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "only 7 valid samples of the 8 asked" in err and "non-finite: 1" in err
    assert not any((tmp_path / "more").glob("*.tar")) and not (tmp_path / "more" / "manifest.json").exists()


def test_overwrite_replaces_an_earlier_subset(source, tmp_path):
    out = tmp_path / "sub"
    assert subset(source, "--out", out, "--samples", 20, "--split", "train") == 0
    assert subset(source, "--out", out, "--samples", 3, "--overwrite") == 0
    assert open_dataset(out).split_samples("train") == 3
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]


@pytest.mark.parametrize("case, message", [
    ("split", "has no split 'test' (it has: train, eval): pass --split one of them"),
    ("zero", "--samples must be >= 1, got 0"),
    ("too_many", "--samples 41 but split 'train' of {src} has 40 samples: pass --samples 40 or fewer"),
    ("exists", "--out {out} already exists and is not empty: pass --overwrite or choose another --out"),
    ("same", "--out {src} is the source dataset, which subset never modifies: choose another --out"),
])
def test_errors_are_one_line_and_write_nothing(source, tmp_path, capsys, case, message):
    out = tmp_path / "sub"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = {"split": ["--samples", 4, "--split", "test"], "zero": ["--samples", 0],
            "too_many": ["--samples", 41], "exists": ["--samples", 4]}.get(case, ["--samples", 4])
    target = source if case == "same" else out
    before, mine = _snapshot(source), _snapshot(out)
    capsys.readouterr()
    assert subset(source, "--out", target, *args, *(["--overwrite"] if case == "same" else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("blip3o-fast data: error: ")
    assert message.format(src=source, out=out) in err
    assert _snapshot(source) == before and _snapshot(out) == mine


def test_the_overfit_config_trains_and_evaluates_on_the_same_samples(capsys):
    assert main(["config", "list"]) == 0
    assert any(line.startswith("overfit ") for line in capsys.readouterr().out.splitlines())
    cfg = load_config("overfit")
    assert cfg.data.eval_split == cfg.data.train_split == "train" and cfg.data.path == "demo/overfit"
    assert cfg.data.batch_size == cfg.train.eval_samples == 16  # N: every step and every evaluation sees all of them
    assert cfg.model.cond_drop == 0 and cfg.flow.contrastive_weight == 0
    demo = load_config("demo")
    # the demo's tiny model and task, without the demo recipe's cond_add (the overfit numbers were measured without it)
    assert cfg.model == replace(demo.model, cond_drop=0.0, cond_add=False) and cfg.task == demo.task
    assert cfg.train.eval_every == cfg.train.steps  # one evaluation, at the end


@pytest.mark.slow
def test_overfit_mode_memorises_its_samples_through_the_cli(tmp_path):
    """`make overfit` as it runs: the demo data, its first 16 train samples, the shipped config (its steps, one
    thread), then `eval` on the train split: patch cosine >= 0.99 on the samples trained on."""
    data, sub, run = tmp_path / "data", tmp_path / "overfit", tmp_path / "run"
    cli("data", "synth", "--out", str(data), "--quiet")
    cli("data", "subset", str(data), "--out", str(sub), "--samples", "16", "--quiet")
    cli("train", "--config", "overfit", "--out", str(run), f"data.path={sub}")
    during = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    during = [r for r in during if r["kind"] == "eval"]
    assert len(during) == 1 and during[0]["patch_cosine"] >= 0.99
    shown = cli("eval", "--run", str(run), "--split", "train").stdout
    assert "16 samples of split 'train'" in shown
    report = json.loads((run / "eval" / "step-0000400-euler20.json").read_text())
    assert (report["split"], report["samples"], report["total_in_split"]) == ("train", 16, 16)
    assert report["metrics"]["patch_cosine"]["model"] >= 0.99
