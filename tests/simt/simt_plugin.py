"""pytest plugin of `make simt-test` (tests/simt/check_*.py are collected only there, by name): loads
the emulated CUDA kernels (build/cmake/libblip3o_fast_simt.so, csrc/simt/) over the blip3o_fast CPU
kernels of this process, so every op test that runs on "cpu" runs the CUDA kernels' own source on the
SIMT emulator (docs/simt.md).

Overriding the CPU kernels (rather than a second op namespace) lets the existing tests, opcheck and
torch.compile included, reach the emulated kernels unchanged.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

DEFAULT_LIB = Path(__file__).resolve().parents[2] / "build/cmake/libblip3o_fast_simt.so"
LIB = Path(os.environ.get("BLIP3O_FAST_SIMT_LIB", DEFAULT_LIB))


# too large to emulate (271k warps per launch); check_kernels.py covers the same paths (a grid-striding
# qk-norm backward, the 1024 partial rows) on a shape the emulator runs in seconds
DESELECT = ("tests/test_ops_qk_norm_rope.py::test_matches_reference[shape7-",)


def pytest_collection_modifyitems(config, items):
    drop = [item for item in items if item.nodeid.startswith(DESELECT)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if item not in drop]


def pytest_configure(config):
    import blip3o_fast.ops.fused  # noqa: F401  (the schemas, and the CPU kernels being replaced)

    assert LIB.exists(), f"{LIB} is missing: build it with `make simt-test`"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": that is the point
        torch.ops.load_library(str(LIB))
    torch.ops.blip3o_fast_simt.launches()  # the library is loaded and its control ops answer
