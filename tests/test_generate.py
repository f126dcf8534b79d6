"""Generation (docs/architecture.md §3.13): per-sample seeding (batch size and position), the float32
ODE state, bad inputs, `blip3o-fast generate` against the API, the dataset tools and webdataset's own reader,
conditions without targets, two processes against one, and a killed run that resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from test_export import cli, conditions, exported, trained_run  # noqa: F401  (session fixtures)
from test_train import ROOT, env, small_data  # noqa: F401

from blip3o_fast.data import EvalLoader, TrainLoader, open_dataset
from blip3o_fast.data.writer import ShardSetWriter, save_manifest
from blip3o_fast.errors import UserError
from blip3o_fast.inference.generate import FAULT_ENV


@pytest.fixture(scope="module")
def gen(exported):  # noqa: F811
    from blip3o_fast import FeatureGenerator

    return FeatureGenerator.from_pretrained(exported, device="cpu")


def read_split(path, split):
    ds = open_dataset(path)
    out = {"key": [], "cond": [], "target": [], "captions": [], "text": []}
    for batch in EvalLoader(ds, split, 16, pin_memory=False):
        out["key"] += batch["key"]
        out["captions"] += batch["captions"]
        out["cond"].append(batch["cond"].clone())
        if "target" in batch:
            out["target"].append(batch["target"].clone())
        if "text" in batch:
            out["text"] += [t[m].clone() for t, m in zip(batch["text"], batch["text_mask"])]
    out["cond"] = torch.cat(out["cond"])
    out["target"] = torch.cat(out["target"]) if out["target"] else None
    return ds, out


def test_results_do_not_depend_on_batch_size_or_position(gen):
    """Each sample's noise is its own; another batching changes only the rounding of the batched matmuls (CPU
    GEMMs block by the row count), so results agree to float32 rounding, and bitwise with the same batching."""
    cond = conditions(gen, 9)
    whole = gen.generate(cond, steps=3, seed=1, batch_size=256)
    assert torch.equal(gen.generate(cond, steps=3, seed=1, batch_size=256), whole)
    for batch_size in (1, 4):
        torch.testing.assert_close(gen.generate(cond, steps=3, seed=1, batch_size=batch_size), whole,
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gen.generate(cond[:3], steps=3, seed=1), whole[:3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gen.generate(cond, steps=3, seed=2), whole, atol=1e-2)  # the seed matters
    keys = [f"k{i}" for i in range(9)]
    by_key = gen.generate(cond, steps=3, seed=1, keys=keys, batch_size=1)
    picked = [5, 0, 7]  # by key, a sample's result does not depend on where it sits
    assert torch.equal(gen.generate(cond[picked], steps=3, seed=1, keys=[keys[i] for i in picked], batch_size=1),
                       by_key[picked])
    as_numpy = gen.generate(cond.numpy(), steps=3, seed=1)
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, whole.numpy())


def test_ode_state_stays_float32_with_a_low_precision_model(exported):  # noqa: F811
    from blip3o_fast import FeatureGenerator
    from blip3o_fast.model.flow import sample

    fp32 = FeatureGenerator.from_pretrained(exported, device="cpu")
    bf16 = FeatureGenerator.from_pretrained(exported, device="cpu", dtype="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    cond = conditions(fp32, 3)
    noise = torch.randn(3, fp32.task.target_tokens, fp32.task.target_dim)
    x = sample(bf16.model, cond.bfloat16(), 4, noise=noise)
    assert x.dtype == torch.float32  # the state starts float32 and bf16 velocities do not round it
    low, high = bf16.generate(cond, steps=4), fp32.generate(cond, steps=4)
    assert low.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(low.flatten(1), high.flatten(1)).min() > 0.99
    with pytest.raises(UserError, match="sampling noise of shape"):
        sample(fp32.model, cond, 2, noise=noise[:2])


def test_bad_inputs_are_one_line_errors(gen):
    t = gen.task
    want = f"expected \\[B, {t.cond_tokens}, {t.cond_dim}\\]"
    for bad in (torch.zeros(2, t.cond_tokens, t.cond_dim + 1), torch.zeros(t.cond_tokens, t.cond_dim),
                np.zeros((1, t.cond_tokens + 1, t.cond_dim), np.float32)):
        with pytest.raises(UserError, match=want):
            gen.generate(bad)
    with pytest.raises(UserError, match="must be floating point"):
        gen.generate(torch.zeros(2, t.cond_tokens, t.cond_dim, dtype=torch.int64))
    with pytest.raises(UserError, match="torch tensor or numpy array"):
        gen.generate([[0.0]])
    with pytest.raises(UserError, match="got 1 keys for 2 conditions"):
        gen.generate(torch.zeros(2, t.cond_tokens, t.cond_dim), keys=["a"])
    with pytest.raises(UserError, match="sampler must be euler or heun"):
        gen.generate(torch.zeros(1, t.cond_tokens, t.cond_dim), sampler="rk4")
    with pytest.raises(UserError, match=f"expected \\[B, {t.target_tokens}, {t.target_dim}\\]"):
        gen.image_embedding(torch.zeros(1, 3, 3))


def test_generate_cli_matches_the_api_and_the_dataset_tools_read_it(gen, exported, small_data, tmp_path):  # noqa: F811
    out = tmp_path / "gen"
    result = cli("generate", "--model", str(exported), "--data", str(small_data), "--split", "eval", "--out",
                 str(out), "--steps", "3", "--batch-size", "8", "--seed", "5", "--quiet")
    assert "samples/s" in result.stdout and "generated 48 samples" in result.stdout
    src_ds, src = read_split(small_data, "eval")
    ds, got = read_split(out, "eval")
    assert got["key"] == src["key"] and got["captions"] == src["captions"]
    assert torch.equal(got["cond"], src["cond"])
    assert all(torch.equal(a, b) for a, b in zip(got["text"], src["text"])) and len(got["text"]) == 48
    api = gen.generate(src["cond"], steps=3, seed=5, keys=src["key"], batch_size=8)  # the CLI's batches
    assert torch.equal(got["target"], api.half()), "the CLI wrote other features than the API generates"
    assert ds.task == src_ds.task and ds.head_path is not None and ds.target_dim == gen.task.target_dim
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["created_by"]["command"] == "blip3o-fast generate"
    # the project's tools read it: inspect (with checksums), eval, and webdataset's own reader
    assert cli("data", "inspect", str(out), "--quiet").returncode == 0
    cli("eval", "--model", str(exported), "--data", str(out), "--steps", "3", "--max-samples", "16")
    assert (exported / "eval" / "model-euler3-s3.json").is_file()  # demo.yaml's eval.timestep_shift 3
    urls = [str(out / s["file"]) for s in manifest["splits"]["eval"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == src["key"]
    assert np.array_equal(np.stack([s["target.npy"] for s in samples]), got["target"].numpy())
    bad = cli("generate", "--model", str(exported), "--data", str(small_data), "--out", str(small_data), check=False)
    assert bad.returncode == 2 and "is the source dataset" in bad.stderr
    other = cli("generate", "--model", str(exported), "--data", str(small_data), "--out", str(out), "--seed", "6",
                check=False)
    assert other.returncode == 2 and "seed 5 -> 6" in other.stderr


def test_conditions_without_targets(gen, exported, small_data, tmp_path):  # noqa: F811
    src_ds, src = read_split(small_data, "eval")
    conds = tmp_path / "conds"
    with ShardSetWriter(conds, "eval", src_ds.cond, None, src_ds.text, shard_size=20) as writer:
        for i, key in enumerate(src["key"]):
            assert writer.write(key, src["cond"][i].numpy(), None, src["text"][i].numpy(), src["captions"][i])
        assert not writer.write("bad", src["cond"][0].numpy(), np.zeros((1, 1)))  # a target has nowhere to go
    save_manifest(conds, src_ds.task, src_ds.grid, src_ds.cond, None, src_ds.text, {"eval": writer.records})
    ds, read = read_split(conds, "eval")
    assert ds.target is None and not ds.has_targets and read["target"] is None and read["key"] == src["key"]
    assert torch.equal(read["cond"], src["cond"])
    with pytest.raises(UserError, match="conditions only"):
        TrainLoader(ds, "eval", 4, seed=0, pin_memory=False)
    assert cli("data", "inspect", str(conds), "--quiet").returncode == 0
    out = tmp_path / "gen"
    cli("generate", "--model", str(exported), "--data", str(conds), "--out", str(out), "--steps", "2",
        "--batch-size", "16", "--quiet")
    _, got = read_split(out, "eval")
    assert got["key"] == src["key"] and got["target"].shape == (48, gen.task.target_tokens, gen.task.target_dim)
    bad = cli("eval", "--model", str(tmp_path / "nowhere"), "--data", str(conds), check=False)
    assert bad.returncode == 2 and "is not a model folder" in bad.stderr


def shard_bytes(folder, split):
    manifest = json.loads((folder / "manifest.json").read_text())
    return {s["file"]: (folder / s["file"]).read_bytes() for s in manifest["splits"][split]["shards"]}, manifest


def test_a_killed_generate_resumes_without_duplicates_or_gaps(exported, small_data, tmp_path):  # noqa: F811
    args = ["generate", "--model", str(exported), "--data", str(small_data), "--split", "train", "--steps", "2",
            "--batch-size", "16", "--quiet"]
    straight = tmp_path / "straight"
    cli(*args, "--out", str(straight))
    killed = tmp_path / "killed"
    result = cli(*args, "--out", str(killed), check=False, extra_env={FAULT_ENV: "1"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert len(list((killed / ".generate").glob("train-*.json"))) == 1  # one shard finished ...
    assert list(killed.glob("*.tar.partial")), "... and the next one half written"
    assert not (killed / "manifest.json").exists()
    resumed = cli(*args, "--out", str(killed))
    assert "1 of 4 shards already finished" in resumed.stdout
    assert not list(killed.glob("*.partial"))
    got, manifest = shard_bytes(killed, "train")
    want, _ = shard_bytes(straight, "train")
    assert got == want, "the resumed output differs from the uninterrupted one"
    _, src = read_split(small_data, "train")
    _, out = read_split(killed, "train")
    assert out["key"] == src["key"] and len(set(out["key"])) == 192


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(exported, small_data, tmp_path):  # noqa: F811
    args = ["generate", "--model", str(exported), "--data", str(small_data), "--split", "train", "--steps", "2",
            "--batch-size", "16", "--quiet"]
    one = tmp_path / "one"
    cli(*args, "--out", str(one))
    two = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "blip3o_fast.cli", *args, "--out", str(two)], capture_output=True, text=True,
                            env=env(), cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated 192 samples" in result.stdout
    got, manifest_two = shard_bytes(two, "train")
    want, manifest_one = shard_bytes(one, "train")
    assert got == want and manifest_two["splits"] == manifest_one["splits"]
