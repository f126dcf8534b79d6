"""Shared benchmark plumbing: devices, synchronisation, and run metadata saved with every JSON."""

from __future__ import annotations

import subprocess

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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
