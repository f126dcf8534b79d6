"""The compiled extension: its build record, and the one-line errors when it is missing or stale."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from blip3o_fast.ops import _extension


def test_build_record_matches_the_running_torch():
    info = _extension.build_info()
    assert info is not None and info["torch"] == torch.__version__
    assert set(info) >= {"torch", "torch_cuda", "cuda", "cuda_archs", "cxx", "debug"}
    assert _extension.has_kernel("rope3d", "cpu") and _extension.has_kernel("flow_matching_loss_bwd", "cpu")


def test_stale_build_is_refused_in_one_line(tmp_path, monkeypatch):
    record = tmp_path / "_C.build.json"
    record.write_text(json.dumps({"torch": "1.0.0"}))
    monkeypatch.setattr(_extension, "_INFO_FILE", record)
    with pytest.raises(_extension.ExtensionError) as e:
        _extension.load()
    assert str(e.value) == (f"blip3o_fast._C was built for torch 1.0.0 but torch {torch.__version__} is running: "
                            f"rebuild it with `make setup` (or `pip install --no-build-isolation -e .`)")


def test_missing_library_is_reported_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(_extension, "_INFO_FILE", tmp_path / "absent.json")

    def missing(name):
        raise ImportError(f"No module named '{name}'\nsecond line of noise")

    monkeypatch.setattr(_extension.importlib, "import_module", missing)
    with pytest.raises(_extension.ExtensionError) as e:
        _extension.load()
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("blip3o_fast._C could not be loaded (No module named 'blip3o_fast._C'): rebuild")


def test_device_without_kernels_is_a_one_line_error():
    if torch.cuda.is_available() and _extension.has_kernel("rope3d", "cuda"):
        _extension.check_device("cuda")
        return
    with pytest.raises(_extension.ExtensionError, match="has no cuda kernels .* set model.fused_ops=false"):
        _extension.check_device("cuda")
    _extension.check_device("cpu")


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "blip3o_fast.cli", "info"], capture_output=True, text=True, check=True)
    assert "extension        loaded" in out.stdout and f"torch          {torch.__version__}" in out.stdout
    data = json.loads(subprocess.run([sys.executable, "-m", "blip3o_fast.cli", "info", "--json"], capture_output=True,
                                     text=True, check=True).stdout)
    assert data["build"]["torch"] == torch.__version__ and data["kernels"]["cpu"] is True
