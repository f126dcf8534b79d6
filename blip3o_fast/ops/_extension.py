"""Loads the compiled extension blip3o_fast._C, or says in one line why it cannot and how to fix it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from ..errors import UserError

REBUILD = "rebuild it with `make setup` (or `pip install --no-build-isolation -e .`)"
CUDA_REBUILD = ("rebuild it with CUDA_HOME set and BLIP3O_FAST_FORCE_CUDA=1 (which fails loudly where CUDA "
                "cannot be built)")
_INFO_FILE = Path(__file__).resolve().parent.parent / "_C.build.json"
_cuda_stubs = None  # the torch.library.Library holding the CUDA stubs of a CPU-only build (kept alive)
_stubbed: set[str] = set()  # the ops whose CUDA "kernel" is such a stub


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
        # an installed wheel pins torch to its build (setup.py), so this is a torch changed afterwards
        raise ExtensionError(
            f"blip3o_fast._C was built for torch {info.get('torch')} but torch {torch.__version__} is "
            f"running: pip install 'torch=={info.get('torch')}', or {REBUILD}"
        )
    try:
        importlib.import_module("blip3o_fast._C")
    except ImportError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExtensionError(f"blip3o_fast._C could not be loaded ({first}): {REBUILD}") from None
    _stub_missing_cuda_kernels()


def build_kind() -> str:
    """Which build is loaded, in words: "CUDA build (archs ...)" or "CPU-only build (no CUDA kernels)"."""
    info = build_info() or {}
    if has_kernel("rope3d", "cuda"):
        return f"CUDA build (archs {info.get('cuda_archs')}, nvcc {info.get('nvcc')})"
    return "CPU-only build (no CUDA kernels)"


def _stub_missing_cuda_kernels() -> None:
    """A CPU-only build on a CUDA torch: without a CUDA kernel the first op on a CUDA tensor fails with
    the dispatcher's page-long "Could not run ... with arguments from the 'CUDA' backend"; a stub per op
    says in one line which build is loaded and how to get the other."""
    global _cuda_stubs
    if _cuda_stubs is not None:
        return
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("blip3o_fast::")]
    missing = [n for n in names if not _dispatch_has_cuda(n)]
    if not missing:
        return
    _cuda_stubs = torch.library.Library("blip3o_fast", "IMPL")
    for name in missing:
        _cuda_stubs.impl(name, _no_cuda_kernel(name), "CUDA")
    _stubbed.update(missing)


def _no_cuda_kernel(name: str):
    def stub(*args, **kwargs):
        raise ExtensionError(f"blip3o_fast::{name} got a CUDA tensor but the loaded blip3o_fast._C is a CPU-only "
                             f"build: {CUDA_REBUILD}, or set model.fused_ops=false")
    return stub


def _dispatch_has_cuda(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"blip3o_fast::{name}", "CUDA")


def has_kernel(op: str, device_type: str) -> bool:
    """Whether op (e.g. "rope3d") has a kernel for device_type ("cpu" or "cuda") in this build."""
    load()
    if device_type == "cuda":
        return op not in _stubbed and _dispatch_has_cuda(op)  # a stub is not a kernel
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"blip3o_fast::{op}", "CPU")


def check_device(device: torch.device | str) -> None:
    """Raises a one-line error when the fused ops have no kernels for `device` in this build."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda") or not has_kernel("rope3d", device_type):
        raise ExtensionError(
            f"blip3o_fast._C has no {device_type} kernels (built with cuda={(build_info() or {}).get('cuda')}): "
            f"set model.fused_ops=false, or {CUDA_REBUILD} and a CUDA build of torch"
        )
