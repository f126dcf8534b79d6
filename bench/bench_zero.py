"""Training throughput under ZeRO stages 0, 1 and 2 on 2 processes (torchrun; gloo on CPU, NCCL on GPUs).

Each stage trains the tiny demo model for a few dozen steps through the real trainer; samples/s is
the trainer's own figure (metrics.jsonl, first log window dropped), so process start-up and
DeepSpeed initialisation are not counted. The benchmark's own time is the whole run, start-up
included. The overhead of stage s is samples/s(stage 0) / samples/s(stage s) - 1.

    pytest bench/bench_zero.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blip3o_fast.data.synth import SynthSpec, write_synth

ROOT = Path(__file__).resolve().parent.parent
STEPS, LOG_EVERY = 40, 10
RESULTS: dict[int, float] = {}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero") / "data"
    write_synth(out, SynthSpec(train_samples=1024, eval_samples=32, shard_size=256), progress=False)
    return out


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stage(benchmark, stage, demo_data, tmp_path):
    run = tmp_path / f"zero{stage}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "blip3o_fast.cli", "train", "--config", "demo", "--out", str(run),
           f"data.path={demo_data}", f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}",
           f"train.ckpt_every={10 * STEPS}", "train.eval_every=0", f"train.zero_stage={stage}", "data.num_workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))

    def train():
        subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT, timeout=900)

    benchmark.group = "train zero stages 2 procs"
    benchmark.pedantic(train, rounds=1, iterations=1)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if r["kind"] == "train"][1:]
    RESULTS[stage] = sum(rates) / len(rates)
    benchmark.extra_info.update(impl=f"zero{stage}", stage=stage, processes=2, samples_per_s=RESULTS[stage])


def test_report_overheads(capsys):
    lines = [f"{'stage':>5} {'samples/s':>10} {'overhead vs stage 0':>20}"]
    for stage, rate in sorted(RESULTS.items()):
        overhead = RESULTS[0] / rate - 1 if 0 in RESULTS else float("nan")
        lines.append(f"{stage:5d} {rate:10.1f} {100 * overhead:19.1f}%")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
