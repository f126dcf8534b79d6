"""Evaluation: Recall@K against a brute-force ranking, the chance formula against simulation, the
baselines on known inputs, and the `eval` command end to end on a trained run."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
from test_train import ROOT, env, run_train, small_data  # noqa: F401  (the session dataset fixture)

from blip3o_fast.evaluation.evaluate import (
    _report,
    chance_recall,
    format_report,
    recall_at_k,
    report_name,
    sampling_label,
)


def brute_force_recall(scores, owner, k):
    """Sort every caption by score, ties broken against the image (its negatives first); hit if any
    of its own captions is among the first k."""
    n_img, n_cap = scores.shape
    hits = 0
    for i in range(n_img):
        order = sorted(range(n_cap), key=lambda c: (-scores[i, c].item(), owner[c] == i))
        hits += any(owner[c] == i for c in order[:k])
    return hits / n_img


@pytest.mark.parametrize("seed", range(6))
def test_recall_matches_brute_force_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n_img = 13
    counts = torch.randint(1, 5, (n_img,), generator=g)
    owner = torch.repeat_interleave(torch.arange(n_img), counts)
    # few distinct values: many exact ties between captions
    scores = torch.randint(0, 4, (n_img, len(owner)), generator=g).float()
    positives = owner[None, :] == torch.arange(n_img)[:, None]
    got = recall_at_k(scores, positives, ks=(1, 2, 5, 10), chunk=4)
    for k in (1, 2, 5, 10):
        assert got[k] == pytest.approx(brute_force_recall(scores, owner.tolist(), k)), k


def test_recall_edge_cases():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.8]])
    positives = torch.tensor([[True, False, False], [False, True, False]])
    # image 1 ties with a negative at the top: pessimistic, so rank 1
    assert recall_at_k(scores, positives, ks=(1, 2)) == {1: 0.5, 2: 1.0}
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(scores, torch.zeros_like(positives))


def test_chance_recall_matches_simulation():
    counts = torch.tensor([1, 2, 5, 3])
    owner = torch.repeat_interleave(torch.arange(4), counts).tolist()
    rng = random.Random(0)
    trials, hits = 20000, {1: 0, 5: 0}
    for _ in range(trials):
        order = list(range(len(owner)))
        rng.shuffle(order)
        for k in hits:
            hits[k] += sum(any(owner[c] == i for c in order[:k]) for i in range(4)) / 4
    expect = chance_recall(counts, len(owner), ks=(1, 5))
    for k in hits:
        assert hits[k] / trials == pytest.approx(expect[k], abs=0.01)
    assert chance_recall(torch.tensor([1]), 1, ks=(1, 10)) == {1: 1.0, 10: 1.0}


def test_report_baselines_on_known_inputs():
    """Perfect predictions score like the oracle; the dataset-mean embedding ranks every image alike."""
    n, d = 4, 3
    emb = torch.nn.functional.normalize(torch.eye(4)[:, :d] + 0.1, dim=-1)
    c = {
        "count": torch.tensor([n]), "patch_cos": torch.ones(n), "chance_patch_cos": torch.zeros(n),
        "mean_patch_cos": torch.full((n,), 0.5), "emb_model": emb, "emb_oracle": emb, "emb_chance": emb.flip(0),
        "text": emb.repeat_interleave(2, 0), "caption_count": torch.full((n,), 2),
    }
    report = _report(c, has_text=True, has_cls=False, mode="mean", has_head=True,
                     settings=dict(split="eval", sampler="euler", steps=1, guidance_scale=1.0, timestep_shift=1.0,
                                   total_in_split=n))
    m = report["metrics"]
    assert m["patch_cosine"] == {"model": 1.0, "oracle": 1.0, "dataset_mean": 0.5, "chance": 0.0}
    assert m["recall@1"]["model"] == m["recall@1"]["oracle"] == 1.0
    assert m["recall@1"]["dataset_mean"] <= 0.5  # one shared query: at most the top pair of captions' owner
    assert m["recall@1"]["chance"] == pytest.approx(chance_recall(torch.full((n,), 2), 8, ks=(1,))[1])
    assert "recall@10" in format_report(report)
    assert "euler 1 steps, guidance" in format_report(report)  # no shift: none named


def test_report_names_and_header_carry_every_sampling_setting():
    """A sweep over shifts or guidance must not overwrite one report with another, nor print them alike."""
    base = dict(sampler="euler", steps=4, guidance_scale=1.0, timestep_shift=1.0)
    assert report_name("step-0001600", base) == "step-0001600-euler4"
    assert report_name("step-0001600", {**base, "timestep_shift": 3.0}) == "step-0001600-euler4-s3"
    assert report_name("model", {**base, "timestep_shift": 2.5, "guidance_scale": 2.0}) == "model-euler4-s2.5-g2.0"
    assert sampling_label({**base, "timestep_shift": 3.0}) == "euler 4 steps, shift 3"
    assert sampling_label(base) == "euler 4 steps"


@pytest.mark.slow
def test_eval_command_end_to_end(small_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    run_train(small_data, run, 4, "train.ckpt_every=2", "train.eval_every=2", "train.eval_samples=16",
              "eval.steps=2", "eval.batch_size=8")
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and "patch_cosine" in evals[0] and "recall@1" in evals[0]
    result = subprocess.run([sys.executable, "-m", "blip3o_fast.cli", "eval", "--run", str(run), "--steps", "3",
                             "--sampler", "heun", "--max-samples", "24"], capture_output=True, text=True, env=env(),
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "eval" / "step-0000004-heun3-s3.json").read_text())
    assert report["samples"] == 24 and report["sampler"] == "heun" and report["steps"] == 3
    assert report["timestep_shift"] == 3.0  # the run config's (demo.yaml), named in the file
    for metric in ("patch_cosine", "global_cosine", "cls_cosine", "recall@1", "recall@5", "recall@10"):
        row = report["metrics"][metric]
        assert set(row) == {"model", "oracle", "dataset_mean", "chance"}
        assert all(-1.0 <= v <= 1.0 for v in row.values())
    assert report["metrics"]["recall@1"]["oracle"] > 0.8  # the synthetic captions are tied to the targets
    assert "recall@10" in result.stdout and "dataset_mean" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "blip3o_fast.cli", "eval", "--run", str(tmp_path)],
                         capture_output=True, text=True, env=env(), cwd=ROOT)
    assert bad.returncode == 2 and "is not a run folder" in bad.stderr


def test_a_sample_without_a_caption_is_a_one_line_error(tmp_path):
    """Recall@K needs a caption per image: a split with a caption-less sample fails in one line, not a traceback."""
    import numpy as np

    from blip3o_fast.config import load_config
    from blip3o_fast.data import open_dataset
    from blip3o_fast.data.format import StreamSpec, TextSpec
    from blip3o_fast.data.writer import ShardSetWriter, save_manifest
    from blip3o_fast.errors import UserError
    from blip3o_fast.evaluation import evaluate
    from blip3o_fast.model import DiT
    from blip3o_fast.runtime import distributed

    cfg = load_config("demo", ["task.grid=[2, 2]", "task.cond_dim=8", "task.target_dim=4", "task.target_cls=false",
                               "flow.cls_loss_weight=0",
                               "model.hidden_size=16", "model.depth=1", "model.num_heads=2", "model.fused_ops=false",
                               "data.num_workers=0", "eval.batch_size=4"])
    cond, target = StreamSpec("eva_clip", "c", 8, 4, False), StreamSpec("clip", "t", 4, 4, False)
    rng = np.random.default_rng(0)
    with ShardSetWriter(tmp_path, "eval", cond, target, TextSpec(3, 2)) as w:
        for i in range(3):
            captions = [] if i == 1 else ["a", "b"]
            w.write(f"k{i}", rng.normal(size=(4, 8)), rng.normal(size=(4, 4)), rng.normal(size=(len(captions), 3)),
                    captions)
    save_manifest(tmp_path, "eva_to_clip", (2, 2), cond, target, TextSpec(3, 2), {"eval": w.records})
    with pytest.raises(UserError) as e:
        evaluate(DiT(cfg.model, cfg.task), open_dataset(tmp_path), cfg, distributed.init(), steps=1, progress=False)
    assert str(e.value) == ("1 of 3 samples of the eval split have no caption, and image->text Recall@K needs one per "
                            "image: extract skips such images; evaluate a split whose samples all have captions")
