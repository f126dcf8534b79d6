"""Elastic resume: a run saved with one number of ranks continues with another (docs/architecture.md §3.11).

Every sample key a rank trains on is recorded (trainer.KEYS_ENV). Within the epoch the checkpoint was
taken in, the samples read before the resume and those the new ranks read to finish that epoch must be
the train split, each exactly once; the step counter, the optimizer moments and the EMA carry over.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_train import losses, run_train, small_data  # noqa: F401  (the session dataset fixture)

from blip3o_fast.data import open_dataset
from blip3o_fast.data.tario import index_shard
from blip3o_fast.engine.trainer import KEYS_ENV


def recorded(folder: Path, rank: int) -> list[str]:
    path = folder / f"keys-rank{rank}.txt"
    return [line.split()[1] for line in path.read_text().splitlines()] if path.exists() else []


def rest_of_epoch(seen: set[str], keys: list[str]) -> list[str]:
    """The prefix a new rank read before its next epoch began: up to the first key read before."""
    out: list[str] = []
    for key in keys:
        if key in seen or key in out:
            break
        out.append(key)
    return out


def train_keys(data: Path) -> list[str]:
    ds = open_dataset(data)
    return [s.key for shard in ds.shards("train") for s in index_shard(shard.path).samples]


def adam_steps(checkpoint: Path) -> set[int]:
    """Adam's step counts in a DeepSpeed checkpoint: whole under ZeRO-0, one partition per rank under 1-2."""
    states = []
    for f in sorted(checkpoint.glob("zero_pp_rank_*_optim_states.pt")):
        states.append(torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
                      ["base_optimizer_state"])
    if not states:
        states.append(torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu",
                                 weights_only=False)["optimizer"])
    return {int(s["step"]) for state in states for s in state["state"].values()}


@pytest.mark.slow
@pytest.mark.parametrize("before,after,steps", [(2, 1, 22), (1, 2, 16)])
def test_elastic_resume_reads_each_sample_of_the_epoch_once(small_data, tmp_path, before, after, steps):  # noqa: F811
    run, pre, post = tmp_path / "run", tmp_path / "pre", tmp_path / "post"
    pre.mkdir(), post.mkdir()
    run_train(small_data, run, 3, "train.ckpt_every=100", procs=before, extra_env={KEYS_ENV: str(pre)})
    result = run_train(small_data, run, steps, "train.ckpt_every=100", procs=after, extra_env={KEYS_ENV: str(post)})
    assert f"elastic resume: {before} -> {after} ranks" in result.stdout
    assert "weights and optimizer state loaded whole" in result.stdout  # ZeRO-0 (the default)

    seen = [k for r in range(before) for k in recorded(pre, r)]
    assert len(seen) == 3 * 8 * before and len(set(seen)) == len(seen)
    rest = [rest_of_epoch(set(seen), recorded(post, r)) for r in range(after)]
    epoch = seen + [k for part in rest for k in part]
    assert sorted(epoch) == sorted(train_keys(small_data)), "each sample of the epoch exactly once"

    got = losses(run)
    assert sorted(got) == list(range(1, steps + 1)) and all(math.isfinite(v) for v in got.values())
    # the optimizer continued: Adam counted every step, not only those after the resume
    assert adam_steps(run / "checkpoints" / f"step-{steps:07d}") == {steps}


@pytest.mark.slow
def test_elastic_resume_re_shards_a_zero_2_optimizer(small_data, tmp_path):  # noqa: F811
    """2 -> 1 ranks under ZeRO-2, whose Adam moments are split per rank: DeepSpeed's universal checkpoint
    re-shards them, and the resumed steps train as the same resume under ZeRO-0 (whole state) does."""
    got = {}
    for stage in (0, 2):
        run = tmp_path / f"stage{stage}"
        run_train(small_data, run, 3, "train.ckpt_every=100", f"train.zero_stage={stage}", procs=2)
        result = run_train(small_data, run, 5, "train.ckpt_every=100", f"train.zero_stage={stage}", procs=1)
        got[stage] = losses(run)
    assert "weights and optimizer state re-sharded from DeepSpeed's universal checkpoint" in result.stdout
    assert (run / "checkpoints" / "step-0000003" / "universal" / "step-0000003" / "COMPLETE").is_file()
    assert sorted(got[2]) == [1, 2, 3, 4, 5]
    for step, loss in got[0].items():
        assert got[2][step] == pytest.approx(loss, rel=1e-4, abs=1e-6), step
    assert adam_steps(run / "checkpoints" / "step-0000005") == {5}
