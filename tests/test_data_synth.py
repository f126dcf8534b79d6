"""`data synth`: deterministic, the demo shapes, a relation that is nonlinear and position dependent,
captions an oracle retrieves, and the real shapes on request."""

from __future__ import annotations

import json

import pytest
import torch

from blip3o_fast.cli import main
from blip3o_fast.data import EvalLoader, open_dataset, read_head


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    assert main(["data", "synth", "--out", str(folder), "--quiet"]) == 0
    return open_dataset(folder)


def _all(ds, split):
    batches = list(EvalLoader(ds, split, 512))
    return {k: torch.cat([b[k] for b in batches]) if isinstance(batches[0][k], torch.Tensor)
            else [x for b in batches for x in b[k]] for k in batches[0]}


def test_demo_defaults_match_the_tiny_task(demo):
    ds = demo
    assert (ds.grid, ds.cond_dim, ds.cond_tokens, ds.cond_cls) == ((8, 8), 64, 64, False)
    assert (ds.target_dim, ds.target_tokens, ds.target_cls, ds.text_dim) == (32, 65, True, 16)
    assert ds.split_samples("train") == 4096 and ds.split_samples("eval") == 256
    assert [s.samples for s in ds.shards("train")] == [512] * 8
    assert ds.task == "eva_to_clip" and ds.head_path is not None
    data = _all(ds, "eval")
    counts = data["text_mask"].sum(1)
    assert counts.min() == 2 and counts.max() == 5 and ds.max_captions == 5
    rms = [float(data[k].float().pow(2).mean().sqrt()) for k in ("cond", "target")]
    assert all(0.9 < r < 1.1 for r in rms), rms


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    args = ["data", "synth", "--quiet", "--train-samples", "64", "--eval-samples", "16", "--shard-size", "32"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert main(args + ["--out", str(tmp_path / name), "--seed", seed]) == 0
    sha = {n: [s.sha256 for s in open_dataset(tmp_path / n).shards("train")] for n in "abc"}
    assert sha["a"] == sha["b"] and not set(sha["a"]) & set(sha["c"])
    assert main(args + ["--out", str(tmp_path / "a")]) == 2, "refuses to overwrite without --overwrite"
    assert main(args + ["--out", str(tmp_path / "a"), "--overwrite"]) == 0


def _global(ds, cls: torch.Tensor) -> torch.Tensor:
    weights = read_head(ds.path, ds.target_dim)
    head = weights.tensors
    x = torch.nn.functional.layer_norm(cls.float(), (ds.target_dim,), head["post_layernorm.weight"],
                                       head["post_layernorm.bias"], weights.layer_norm_eps)
    return torch.nn.functional.normalize(x @ head["visual_projection.weight"].T, dim=-1)


def _recall_at_1(image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> float:
    owner = torch.arange(len(image))[:, None].expand(mask.shape)[mask]
    sims = image @ torch.nn.functional.normalize(text[mask].float(), dim=-1).T
    return float((owner[sims.argmax(1)] == torch.arange(len(image))).float().mean())


def test_oracle_retrieves_its_captions_and_baselines_do_not(demo):
    data = _all(demo, "eval")
    oracle = _recall_at_1(_global(demo, data["target"][:, 0]), data["text"], data["text_mask"])
    mean = _global(demo, data["target"][:, 0].float().mean(0, keepdim=True)).expand(256, -1)
    baseline = _recall_at_1(mean + 1e-6 * torch.randn(256, 16), data["text"], data["text_mask"])
    assert oracle > 0.9, oracle
    assert baseline < 0.05, baseline


def test_relation_is_nonlinear_and_position_dependent(demo):
    train, held = _all(demo, "train"), _all(demo, "eval")
    c, t = train["cond"][:2048].double(), train["target"][:2048, 1:].double()
    ch, th = held["cond"].double(), held["target"][:, 1:].double()
    ones = lambda x: torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)
    # the best linear map from the condition patch to the target patch, fitted per position
    w = torch.linalg.lstsq(ones(c).transpose(0, 1), t.transpose(0, 1)).solution  # [S, Dc+1, Dt]
    err = ones(ch).transpose(0, 1) @ w - th.transpose(0, 1)
    linear_r2 = float(1 - err.pow(2).mean() / th.var(0).mean())
    assert 0.2 < linear_r2 < 0.75, linear_r2  # related, but not a linear copy
    # position dependence: the mean target patch differs across the grid
    mean_by_position = t.mean(0)
    assert mean_by_position.std(0).mean() > 0.2
    # learnable: a nearest-neighbour regressor on condition patches beats the per-position mean by far
    knn = torch.cdist(ch[:, 5], c[:, 5]).argmin(1)
    nn_err = (t[knn, 5] - th[:, 5]).pow(2).mean()
    assert nn_err < 0.5 * (mean_by_position[5] - th[:, 5]).pow(2).mean()


def test_real_shapes(tmp_path):
    args = ["data", "synth", "--quiet", "--preset", "real", "--train-samples", "2", "--eval-samples", "1",
            "--out", str(tmp_path / "r"), "--json"]
    assert main(args) == 0
    ds = open_dataset(tmp_path / "r")
    assert (ds.cond_tokens, ds.cond_dim, ds.target_tokens, ds.target_dim, ds.text_dim) == (256, 4096, 256, 1024, 768)
    assert main(args[:-3] + ["--out", str(tmp_path / "c"), "--target-cls"]) == 0
    assert open_dataset(tmp_path / "c").target_tokens == 257
    b = next(iter(EvalLoader(open_dataset(tmp_path / "c"), "train", 2)))
    assert b["cond"].shape == (2, 256, 4096) and b["target"].shape == (2, 257, 1024)


def test_help_lists_the_knobs(capsys):
    with pytest.raises(SystemExit):
        main(["data", "synth", "--help"])
    text = capsys.readouterr().out
    for knob in ("--preset", "--seed", "--train-samples", "--eval-samples", "--shard-size", "--grid", "--cond-dim",
                 "--target-dim", "--text-dim", "--target-cls", "--captions", "--noise", "--caption-noise"):
        assert knob in text


def test_json_summary_reports_the_oracle(tmp_path, capsys):
    assert main(["data", "synth", "--quiet", "--json", "--train-samples", "32", "--eval-samples", "64",
                 "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["eval"]["oracle_recall_at_1"] > 0.9 and summary["chance_recall_at_1"] == 1 / 64
