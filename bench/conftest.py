"""Shared benchmark plumbing: devices, synchronisation, CUDA-event timing, and run metadata saved with every
JSON."""

from __future__ import annotations

import json
import os
import statistics
import subprocess

import pytest
import torch

# BLIP3O_FAST_COLLECT_CUDA=1: the cuda cases without a GPU, for `--collect-only` in `make gpu-check-dry`
COLLECT_CUDA = os.environ.get("BLIP3O_FAST_COLLECT_CUDA") == "1"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() or COLLECT_CUDA else [])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cuda_event_median_s(run, setup=None, rounds: int = 30, warmup: int = 2) -> float:
    """Median GPU time of run() in seconds, between CUDA events recorded on the current stream around it
    (no host synchronisation inside the span), after `warmup` untimed rounds; setup() runs before each
    round, outside the span (e.g. to overwrite the L2 cache)."""
    times = []
    for i in range(warmup + rounds):
        if setup is not None:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    machine_info["blip3o_fast"] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "commit": commit + ("-dirty" if dirty else ""),
    }


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


_FINISHED: list[dict] = []


@pytest.fixture(autouse=True)
def _save_as_you_go(request):
    """BENCH_PARTIAL_JSON=FILE: every finished benchmark is in FILE at once, in --benchmark-json's layout.
    pytest-benchmark writes its JSON when the session ends, so a run stopped by its time limit (the GPU
    script's stages) would otherwise leave nothing."""
    yield
    path = os.environ.get("BENCH_PARTIAL_JSON")
    stats = getattr(request.node.funcargs.get("benchmark"), "stats", None) if path else None
    if stats is None:
        return
    _FINISHED.append(stats.as_dict(include_data=False))
    with open(path + ".tmp", "w") as f:
        json.dump({"benchmarks": _FINISHED}, f, default=str)
    os.replace(path + ".tmp", path)  # whole or absent, never half-written
