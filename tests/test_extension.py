"""The compiled extension: its build record, and the one-line errors when it is missing or stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
                            f"pip install 'torch==1.0.0', or rebuild it with `make setup` (or "
                            f"`pip install --no-build-isolation -e .`)")


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


ROOT = Path(__file__).resolve().parent.parent


def setup_py(env_extra, prelude=""):
    """`python setup.py --name` (setup.py decides CPU or CUDA at import, before any build), with `prelude`
    run first in the same interpreter."""
    code = (f"{prelude}\nimport runpy, sys\nsys.argv = ['setup.py', '--name']\n"
            "runpy.run_path('setup.py', run_name='__main__')")
    env = {**os.environ, "CUDA_HOME": "/nowhere", **env_extra}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_force_cuda_fails_in_one_line_where_cuda_cannot_be_built():
    plain = setup_py({})
    assert plain.returncode == 0 and plain.stdout.strip().endswith("blip3o-fast")  # CPU-only, quietly
    no_nvcc = setup_py({"BLIP3O_FAST_FORCE_CUDA": "1"}, prelude="import torch; torch.version.cuda = '13.0'")
    assert no_nvcc.returncode == 1
    assert no_nvcc.stderr.strip() == ("error: BLIP3O_FAST_FORCE_CUDA=1 but there is no nvcc under CUDA_HOME=/nowhere: "
                                      "set CUDA_HOME to the CUDA toolkit")
    cpu_torch = setup_py({"BLIP3O_FAST_FORCE_CUDA": "1"}, prelude="import torch; torch.version.cuda = None")
    assert cpu_torch.returncode == 1 and cpu_torch.stderr.count("\n") == 1
    assert "is a CPU-only build: install a CUDA build of torch" in cpu_torch.stderr
    both = setup_py({"BLIP3O_FAST_FORCE_CUDA": "1", "BLIP3O_FAST_CPU_ONLY": "1"})
    assert both.returncode == 1 and "contradict" in both.stderr


def test_default_archs_carry_ptx_for_newer_gpus():
    assert '"8.0;9.0+PTX"' in (ROOT / "setup.py").read_text()
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"' in (ROOT / "Makefile").read_text()


@pytest.mark.skipif(_extension.has_kernel("rope3d", "cuda"), reason="a CUDA build has real CUDA kernels")
def test_cuda_tensor_on_a_cpu_only_build_is_a_one_line_error():
    """What the first op on a CUDA tensor reaches: the CUDA dispatch key, called here with CPU tensors."""
    q = torch.randn(1, 2, 1, 4)
    cos = torch.ones(2, 4)
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    for op in (torch.ops.blip3o_fast.rope3d.default, torch.ops.blip3o_fast.swiglu_bwd.default):
        args = (q, q, cos, cos, cos, cos) if op is torch.ops.blip3o_fast.rope3d.default else (q[..., :2], q)
        with pytest.raises(_extension.ExtensionError) as e:
            op.redispatch(cuda, *args)
        assert "\n" not in str(e.value) and "CPU-only build" in str(e.value)
        assert "CUDA_HOME" in str(e.value) and "BLIP3O_FAST_FORCE_CUDA=1" in str(e.value)
    assert _extension.build_kind() == "CPU-only build (no CUDA kernels)"


def test_info_names_the_loaded_build():
    out = subprocess.run([sys.executable, "-m", "blip3o_fast.cli", "info"], capture_output=True, text=True, check=True)
    kind = _extension.build_kind()
    assert f"extension        loaded, {kind}" in out.stdout


def test_eval_checks_the_device_has_kernels(tmp_path, monkeypatch, capsys):
    """eval on a device this build has no kernels for stops at once, in one line, as train does."""
    from blip3o_fast.cli.main import main
    from blip3o_fast.runtime import distributed

    real = _extension.has_kernel
    monkeypatch.setattr(_extension, "has_kernel", lambda op, dev: dev != "cuda" and real(op, dev))  # as CPU-only
    (tmp_path / "config.yaml").write_text("model:\n  fused_ops: true\n")
    monkeypatch.setattr(distributed, "init", lambda: distributed.Dist(0, 1, 0, torch.device("cuda", 0)))
    assert main(["eval", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no cuda kernels" in err, err
