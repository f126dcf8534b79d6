"""`make cuda-check`: the CUDA build, checked on a machine without a GPU.

Run from the build folder of a CUDA build (see the Makefile). It asserts that the extension was
compiled with CUDA for the requested archs, that every op (forward and backward) has a CUDA kernel
registered, that the library carries SASS for each arch, and traces every op forward and backward
with fake CUDA tensors (shapes, dtypes, devices of the fake kernels and the autograd wiring).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import blip3o_fast
from blip3o_fast import ops
from blip3o_fast.ops import _extension

OPS = [
    "rope3d", "rope3d_bwd", "adaln_modulate", "adaln_modulate_bwd", "gated_residual_adaln",
    "gated_residual_adaln_bwd", "flow_interpolate", "flow_interpolate_bwd", "flow_matching_loss",
    "flow_matching_loss_bwd", "swiglu", "swiglu_bwd", "qk_norm_rope3d", "qk_norm_rope3d_bwd",
]


def check(ok: bool, what: str) -> None:
    print(f"  {'ok ' if ok else 'FAIL'} {what}")
    if not ok:
        sys.exit(1)


def check_build() -> None:
    info = _extension.build_info() or {}
    print(f"build: {info}")
    check(info.get("cuda") is True, "extension built with CUDA")
    check(info.get("torch") == torch.__version__, f"built against the running torch {torch.__version__}")
    fused = ops.select(True)
    check(fused is not None, "extension loads")
    for op in OPS:
        check(_extension.has_kernel(op, "cuda") and _extension.has_kernel(op, "cpu"), f"{op}: CPU and CUDA kernels")


def find_cuobjdump() -> str:
    """cuobjdump from PATH, CUDA_HOME, or the copy that ships with triton (a minimal CUDA_HOME may lack it)."""
    candidates = [shutil.which("cuobjdump") or "",
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    found = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    check(found is not None, f"cuobjdump found (looked in {', '.join(c for c in candidates if c)})")
    return found


def demangled_kernel_name(mangled: str) -> str:
    """The `<len><name>` component of an Itanium-mangled symbol that names the *_kernel function
    (the shortest such reading: hashes in anonymous-namespace names can fake a longer one)."""
    names = []
    for i in range(len(mangled)):
        for j in range(i + 1, min(i + 4, len(mangled)) + 1):
            if not mangled[i:j].isdigit():
                break
            name = mangled[j:j + int(mangled[i:j])]
            if name.endswith("_kernel") and name[0].isalpha():
                names.append(name)
    return min(names, key=len) if names else mangled


def check_sass(archs: list[str]) -> None:
    lib = next(p for p in os.listdir(os.path.dirname(blip3o_fast.__file__)) if p.startswith("_C") and p.endswith(".so"))
    path = os.path.join(os.path.dirname(blip3o_fast.__file__), lib)
    cuobjdump = find_cuobjdump()
    listing = subprocess.run([cuobjdump, "--list-elf", path], capture_output=True, text=True, check=True).stdout
    found = sorted(set(re.findall(r"sm_(\d+)", listing)))
    for arch in archs:
        sass = arch.removesuffix("+ptx")
        check(sass in found, f"SASS for sm_{sass} in {lib} (found sm_{', sm_'.join(found)})")
    # +PTX: the newest arch also ships as PTX, which the driver compiles for GPUs newer than every SASS
    ptx = subprocess.run([cuobjdump, "--list-ptx", path], capture_output=True, text=True).stdout
    for arch in (a.removesuffix("+ptx") for a in archs if a.endswith("+ptx")):
        check(f"sm_{arch}" in ptx or f"compute_{arch}" in ptx, f"PTX for compute_{arch} in {lib}")
    # the compiler's resource report: registers, shared memory, and no spills to local memory
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                           check=True).stdout
    kernels = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    check(len(kernels) > 0, f"resource report lists {len(kernels)} kernel instances")
    worst = {}
    for name, reg, stack, shared, local in kernels:
        kernel = demangled_kernel_name(name)
        worst[kernel] = max(worst.get(kernel, (0, 0, 0)), (int(reg), int(stack) + int(local), int(shared)))
    for kernel, (reg, spill, shared) in sorted(worst.items()):
        check(spill == 0, f"{kernel:28s} regs<={reg:3d} static smem<={shared:5d} B, no stack/local memory")


def trace_with_fake_cuda_tensors() -> None:
    """Every forward and backward op on fake CUDA tensors. (The autograd engine itself needs a CUDA
    context, so the backward ops are called directly; their autograd wiring is tested on CPU.)"""
    op = torch.ops.blip3o_fast
    ops.select(True)  # registers the fake kernels
    with FakeTensorMode():
        dev = torch.device("cuda")
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            B, S, H, D, C = 2, 257, 12, 64, 768
            q = torch.randn(B, S, H, D, device=dev, dtype=dtype)
            k = torch.randn(B, S - 1, H, D, device=dev, dtype=dtype)
            tabs = [torch.randn(n, D // 2, device=dev) for n in (S, S, S - 1, S - 1)]
            rq, rk = op.rope3d(q, k, *tabs)
            dq, dk = op.rope3d_bwd(rq, rk, *tabs)
            check(rq.shape == q.shape and rk.shape == k.shape and dq.shape == q.shape and rq.device.type == "cuda"
                  and rq.dtype == dtype, f"rope3d {dtype} forward and backward")

            wq, wk = torch.randn(D, device=dev, dtype=dtype), torch.randn(D, device=dev, dtype=dtype)
            nq, nk, rstd_q, rstd_k = op.qk_norm_rope3d(q, k, wq, wk, 1e-6, *tabs)
            dq, dk, dwq, dwk = op.qk_norm_rope3d_bwd(nq, nk, q, k, wq, wk, rstd_q, rstd_k, *tabs)
            check(nq.shape == q.shape and nk.shape == k.shape and rstd_q.shape == (B, S, H)
                  and rstd_k.dtype == torch.float32 and dq.shape == q.shape and dk.shape == k.shape
                  and dwq.shape == (D,) and dwk.dtype == dtype and nq.device.type == "cuda",
                  f"qk_norm_rope3d {dtype} forward and backward")

            x = torch.randn(B, S, C, device=dev, dtype=dtype)
            y = torch.randn(B, S, C, device=dev, dtype=dtype)
            mod = torch.randn(B, 6 * C, device=dev, dtype=dtype)
            shift, scale, gate = mod[:, :C], mod[:, C:2 * C], mod[:, 2 * C:3 * C]
            for norm in ("layer", "rms"):
                out, mean, rstd = op.adaln_modulate(x, shift, scale, 1e-6, norm)
                dx, dshift, dscale = op.adaln_modulate_bwd(out, x, scale, mean, rstd, norm)
                x_new, h, mean, rstd = op.gated_residual_adaln(x, y, gate, shift, scale, 1e-6, norm)
                grads = op.gated_residual_adaln_bwd(x, h, x_new, y, gate, scale, mean, rstd, norm)
                check(out.shape == x.shape and rstd.shape == (B, S) and rstd.dtype == torch.float32
                      and dx.shape == x.shape and dshift.shape == (B, C) and len(grads) == 5
                      and grads[2].shape == (B, C) and h.device.type == "cuda",
                      f"adaln {norm} {dtype} forward and backward")

            ab = torch.randn(B, S, 2 * 2048, device=dev, dtype=dtype)
            out = op.swiglu(ab)
            check(out.shape == (B, S, 2048) and op.swiglu_bwd(out, ab).shape == ab.shape,
                  f"swiglu {dtype} forward and backward")

            x1 = torch.randn(B, S, 1024, device=dev, dtype=dtype)
            x0 = torch.randn(B, S, 1024, device=dev, dtype=dtype)
            t = torch.rand(B, device=dev)
            x_t = op.flow_interpolate(x1, x0, t)
            d1, d0 = op.flow_interpolate_bwd(x_t, t)
            only1, none0 = op.flow_interpolate_bwd(x_t, t, True, False)
            check(only1.shape == x1.shape and none0.shape == (0,),
                  f"flow_interpolate_bwd {dtype} computes only what is asked")
            loss, mse, cos = op.flow_matching_loss(x_t, x1, x0, t, torch.ones(B, device=dev))
            dv = op.flow_matching_loss_bwd(mse, x_t, x1, x0)
            check(x_t.shape == x1.shape and d0.shape == x1.shape and loss.shape == () and mse.shape == (B,)
                  and loss.dtype == torch.float32 and dv.shape == x1.shape and dv.dtype == dtype,
                  f"flow {dtype} forward and backward")


def main() -> None:
    archs = [a.replace(".", "").lower() for a in os.environ.get("CHECK_ARCHS", "8.0;9.0+PTX").split(";")]
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), checking archs {archs}")
    check_build()
    check_sass(archs)
    trace_with_fake_cuda_tensors()
    print("cuda-check passed")


if __name__ == "__main__":
    main()
