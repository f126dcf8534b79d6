"""Two real processes (`torchrun --nproc_per_node 2`, gloo): training streams are disjoint across ranks
and workers, evaluation reads every sample exactly once, and a resumed stream continues per rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_data_format import write_dataset

SCRIPT = textwrap.dedent("""
    import itertools, json, os, sys
    import torch.distributed as dist
    from blip3o_fast.data import EvalLoader, open_dataset, TrainLoader

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = open_dataset(sys.argv[1])
    def keys(batches):
        return [k for b in batches for k in b["key"]]
    train = TrainLoader(ds, "train", 3, seed=5, rank=rank, world_size=world, num_workers=2)
    it = iter(train)
    head = keys(next(it) for _ in range(3))
    state = train.state_dict()
    tail = keys(next(it) for _ in range(3))
    resumed = TrainLoader(ds, "train", 3, seed=5, rank=rank, world_size=world, num_workers=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    again = keys(itertools.islice(resumed, 3))
    evals = EvalLoader(ds, "eval", 4, rank=rank, world_size=world, num_workers=2)
    out = {"train": head, "tail": tail, "again": again, "eval": keys(evals), "eval_again": keys(evals),
           "num_samples": evals.num_samples}
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        print("RESULT " + json.dumps(gathered))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_processes_disjoint_training_and_exactly_once_eval(tmp_path):
    keys = write_dataset(tmp_path / "ds", {"train": 60, "eval": 27}, shard_size=10)
    script = tmp_path / "read.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on CPU, also on a GPU machine
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script), str(tmp_path / "ds")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    r0, r1 = json.loads(line[len("RESULT "):])
    # 6 shards over 2 ranks x 2 workers: streams of 10 or 20 samples, 9 read per stream here, so none wrapped
    assert not set(r0["train"] + r0["tail"]) & set(r1["train"] + r1["tail"])
    assert len(set(r0["train"] + r0["tail"])) == 18 and len(set(r1["train"] + r1["tail"])) == 18
    assert r0["again"] == r0["tail"] and r1["again"] == r1["tail"]
    assert sorted(r0["eval"] + r1["eval"]) == keys["eval"]
    assert r0["eval"] == r0["eval_again"] and len(r0["eval"]) == r0["num_samples"] == 13
