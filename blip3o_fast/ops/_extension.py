"""Loads the compiled extension blip3o_fast._C, or says in one line why it cannot and how to fix it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from ..errors import UserError

REBUILD = "rebuild it with `make setup` (or `pip install --no-build-isolation -e .`)"
_INFO_FILE = Path(__file__).resolve().parent.parent / "_C.build.json"


class ExtensionError(UserError, ImportError):
    """The compiled extension is missing, stale or unusable; the message is one line with the fix."""


def build_info() -> dict | None:
    """What blip3o_fast._C was built against (written by setup.py beside the library), or None."""
    try:
        return json.loads(_INFO_FILE.read_text())
    except (OSError, ValueError):
        return None


def load() -> None:
    info = build_info()
    if info is not None and info.get("torch") != torch.__version__:
        raise ExtensionError(
            f"blip3o_fast._C was built for torch {info.get('torch')} but torch {torch.__version__} is "
            f"running: {REBUILD}"
        )
    try:
        importlib.import_module("blip3o_fast._C")
    except ImportError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExtensionError(f"blip3o_fast._C could not be loaded ({first}): {REBUILD}") from None


def has_kernel(op: str, device_type: str) -> bool:
    """Whether op (e.g. "rope3d") has a kernel for device_type ("cpu" or "cuda") in this build."""
    load()
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"blip3o_fast::{op}", key)


def check_device(device: torch.device | str) -> None:
    """Raises a one-line error when the fused ops have no kernels for `device` in this build."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda") or not has_kernel("rope3d", device_type):
        raise ExtensionError(
            f"blip3o_fast._C has no {device_type} kernels (built with cuda={(build_info() or {}).get('cuda')}): "
            f"set model.fused_ops=false, or {REBUILD} with CUDA_HOME set and a CUDA build of torch"
        )
