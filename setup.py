"""Builds the one extension, blip3o_fast._C, from csrc/, and declares the core dependencies.

A CUDAExtension when a CUDA toolkit and a CUDA build of torch are both present (decided from
CUDA_HOME/nvcc and torch.version.cuda, never from torch.cuda.is_available(), so the kernels compile
on a machine without a GPU); a CppExtension otherwise.

Knobs (environment):
  BLIP3O_FAST_CPU_ONLY=1   build the CPU kernels only, even where CUDA is available
  BLIP3O_FAST_FORCE_CUDA=1 build the CUDA kernels or fail in one line saying why not (without it a machine
                           lacking nvcc or a CUDA torch quietly gets a CPU-only build)
  TORCH_CUDA_ARCH_LIST     CUDA archs, default "8.0;9.0+PTX" (the PTX JIT-compiles on newer GPUs)
  MAX_JOBS                 parallel compile jobs (read by torch's ninja builder)
  BLIP3O_FAST_DEBUG=1      -O0 -g, device line info (namespaced: a bare DEBUG is often exported by other tools)
  BLIP3O_FAST_REUSE_BUILD=1  package a library already in build/lib* that is newer than every source instead of
                           compiling again (torch's ninja builder otherwise always relinks and recompiles changes)

The wheel requires torch==<the version it was built against> (public part: +cpu/+cu126 builds of one
version share the C++ ABI): the compiled _C loads with no other, so pip must not pair it with another.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
TORCH_PIN = f"torch=={torch.__version__.split('+')[0]}"
# the core: what training needs (extras in pyproject.toml: extract, hub, wandb, flash, dev)
DEPENDENCIES = [
    TORCH_PIN,
    "numpy",
    "pyyaml",
    "tqdm",
    "webdataset>=0.2.86",
    "braceexpand",  # image shard patterns of extract (data/images.py)
    "safetensors",
    "tensorboard",
    "matplotlib",  # loss.png; imported only where it is drawn
    "deepspeed>=0.14",  # the training engine; imported only by training
]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_home():
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    return None


def _want_cuda() -> bool:
    forced, cpu_only = _truthy("BLIP3O_FAST_FORCE_CUDA"), _truthy("BLIP3O_FAST_CPU_ONLY")
    if forced and cpu_only:
        sys.exit("error: BLIP3O_FAST_FORCE_CUDA=1 and BLIP3O_FAST_CPU_ONLY=1 contradict each other: unset one")
    if cpu_only:
        return False
    if forced and torch.version.cuda is None:
        sys.exit(f"error: BLIP3O_FAST_FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build: "
                 "install a CUDA build of torch")
    if forced and _cuda_home() is None:
        home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME or "(unset)"
        sys.exit(f"error: BLIP3O_FAST_FORCE_CUDA=1 but there is no nvcc under CUDA_HOME={home}: "
                 f"set CUDA_HOME to the CUDA toolkit")
    return torch.version.cuda is not None and _cuda_home() is not None


def _compiler_version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1] if cmd[0].endswith("nvcc") else (lines[0] if lines else None)


def _extension():
    debug = _truthy("BLIP3O_FAST_DEBUG")
    with_cuda = _want_cuda()
    # CUDA sources are named <op>_cuda.cu: <op>.cpp and <op>.cu would both compile to <op>.o
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # -g0: Python's CFLAGS carry -g, and debug info for torch's headers doubles a release compile (38 s against
    # 20 s for one of our files on 2 cores); BLIP3O_FAST_DEBUG=1 builds are the ones to debug
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # at::parallel_for is an inline OpenMP loop: without -fopenmp every CPU kernel runs on one thread.
    # libgomp.so.1 is the runtime torch itself is linked against, so no second runtime is loaded.
    cxx += ["-fopenmp"]  # the C++ standard is torch's choice (C++17 up to 2.x, C++20 later)
    # no kernel relies on floating-point exception traps; without this GCC will not turn the clamps and
    # selects of the CPU loops into vector blends, and those loops stay scalar
    cxx += ["-fno-trapping-math"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        nvcc = ["-O0", "-G"] if debug else ["-O3", "-lineinfo"]
        nvcc += ["--use_fast_math", "--expt-relaxed-constexpr"]
        # cuBLAS/cuSPARSE headers of pip-installed CUDA torch builds live in nvidia/cu*/include
        for inc in glob.glob(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)),
                                          "nvidia", "cu*", "include")):
            nvcc += [f"-I{inc}"]
            kwargs["extra_compile_args"]["cxx"] = kwargs["extra_compile_args"]["cxx"] + [f"-I{inc}"]
        kwargs["extra_compile_args"]["nvcc"] = nvcc
        kwargs["define_macros"] = [("BLIP3O_FAST_WITH_CUDA", "1")]
        return cpp_extension.CUDAExtension("blip3o_fast._C", sources, **kwargs), with_cuda
    return cpp_extension.CppExtension("blip3o_fast._C", sources, **kwargs), with_cuda


EXTENSION, WITH_CUDA = _extension()


class BuildExtension(cpp_extension.BuildExtension):
    """torch's builder, plus a `_C.build.json` beside the built library recording what it was built
    against, so a stale build is caught at import with a one-line message instead of a symbol error."""

    def finalize_options(self):
        super().finalize_options()
        if _truthy("BLIP3O_FAST_REUSE_BUILD"):
            self.force = False  # torch forces every build under ninja; distutils then skips an up-to-date library

    def run(self):
        super().run()
        info = {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda": WITH_CUDA,
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if WITH_CUDA else None,
            "nvcc": _compiler_version([os.path.join(_cuda_home(), "bin", "nvcc"), "--version"])
            if WITH_CUDA else None,
            "cxx": _compiler_version([os.environ.get("CXX", "c++"), "--version"]),
            "debug": _truthy("BLIP3O_FAST_DEBUG"),
            "python": sys.version.split()[0],
        }
        for ext in self.extensions:
            out = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_C.build.json")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as f:
                json.dump(info, f, indent=1)
            if self.inplace:
                continue
            # editable installs (PEP 660) build into a temp dir and copy the library into the tree;
            # keep the record beside the copy too
            local = os.path.join(ROOT, "blip3o_fast", "_C.build.json")
            if os.path.exists(os.path.join(ROOT, "blip3o_fast")) and self.editable_mode:
                shutil.copyfile(out, local)


setup(
    install_requires=DEPENDENCIES,
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
