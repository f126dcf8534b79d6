"""Each fused op, forward and forward+backward: fused vs its eager reference vs torch.compile of the
reference, at the base model's shapes (B·S = 4·256 tokens, C = 768, 12 heads of 64, SwiGLU width
2048, target dim 1024) and the tiny demo model's (32·65 tokens, C = 128, 4 heads of 32, width 384,
target dim 32).

    pytest bench/bench_ops.py --benchmark-group-by=group

Groups are "<op> <mode> <shape> <device>"; `blip3o-fast bench report` turns them into ratios. Each
result also records the bytes the pass must move and the achieved GB/s (bytes / median time). On
CUDA the L2 cache is overwritten before every timed round, and the median that counts (GB/s, the
report's ratios) is timed with CUDA events around the kernels (`cuda_event_median_s`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda_event_median_s, sync

from blip3o_fast import ops

SHAPES = {
    "base": dict(B=4, S=256, C=768, H=12, D=64, T=1024),
    "tiny": dict(B=32, S=65, C=128, H=4, D=32, T=32),
}
EPS = 1e-6


def rope_inputs(s, device, dtype):
    q = torch.randn(s["B"], s["S"], s["H"], s["D"], device=device, dtype=dtype)
    k = torch.randn(s["B"], s["S"], s["H"], s["D"], device=device, dtype=dtype)
    cos, sin = ops.rope3d_tables((16, 16), s["D"], device=device) if s["S"] == 256 else \
        ops.rope3d_tables((8, 8), s["D"], cls=True, device=device)
    return [q, k, cos, sin, cos, sin], [0, 1]


def qk_norm_rope_inputs(s, device, dtype):
    (q, k, *tables), _ = rope_inputs(s, device, dtype)
    wq, wk = (1 + 0.1 * torch.randn(2, s["D"], device=device, dtype=dtype)).unbind(0)
    return [q, k, wq.clone(), wk.clone(), EPS, *tables], [0, 1, 2, 3]


def modulate_inputs(s, device, dtype):
    x = torch.randn(s["B"], s["S"], s["C"], device=device, dtype=dtype)
    mod = torch.randn(s["B"], 2 * s["C"], device=device, dtype=dtype)
    return [x, mod[:, :s["C"]], mod[:, s["C"]:]], [0, 1, 2]


def gated_inputs(s, device, dtype):
    x = torch.randn(s["B"], s["S"], s["C"], device=device, dtype=dtype)
    y = torch.randn(s["B"], s["S"], s["C"], device=device, dtype=dtype)
    mod = torch.randn(s["B"], 3 * s["C"], device=device, dtype=dtype)
    C = s["C"]
    return [x, y, mod[:, :C], mod[:, C:2 * C], mod[:, 2 * C:]], [0, 1, 2, 3, 4]


def swiglu_inputs(s, device, dtype):
    width = 64 * -(-2 * 4 * s["C"] // 3 // 64)  # the model's SwiGLU width for hidden C, mlp_ratio 4
    return [torch.randn(s["B"], s["S"], 2 * width, device=device, dtype=dtype)], [0]


def flow_inputs(s, device, dtype):
    shape = (s["B"], s["S"], s["T"])
    x1, x0, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    t = torch.rand(s["B"], device=device)
    return [v, x1, x0, t], [0]


def interp_inputs(s, device, dtype):
    shape = (s["B"], s["S"], s["T"])
    return [torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype),
            torch.rand(s["B"], device=device)], [0]


# op name -> (inputs, the call on an op set returning the outputs to differentiate)
OPS = {
    "rope3d": (rope_inputs, lambda o, a: o.rope3d(*a)),
    "qk_norm_rope3d": (qk_norm_rope_inputs, lambda o, a: o.qk_norm_rope3d(*a)[:2]),
    "adaln_modulate": (modulate_inputs, lambda o, a: o.adaln_modulate(*a, EPS, "layer")[:1]),
    "gated_residual_adaln": (gated_inputs, lambda o, a: o.gated_residual_adaln(*a, EPS, "layer")[:2]),
    "swiglu": (swiglu_inputs, lambda o, a: (o.swiglu(*a),)),
    "flow_interpolate": (interp_inputs, lambda o, a: (o.flow_interpolate(*a),)),
    "flow_matching_loss": (flow_inputs, lambda o, a: o.flow_matching_loss(*a)[:1]),
}
IMPLS = ["fused", "eager", "compiled"]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def make_runner(op_name, impl, shape, device, mode, dtype=torch.float32):
    """(the timed closure, the bytes one call must move at least: each input and output once; with the
    backward also each output gradient read, each input gradient written and each input read again)."""
    make_inputs, call = OPS[op_name]
    inputs, grad_idx = make_inputs(SHAPES[shape], device, dtype)
    op_set = ops.select(impl == "fused")
    fn = lambda *a: call(op_set, a)
    with torch.no_grad():
        out_bytes = nbytes(call(ops.reference, inputs))
    fwd_bytes = nbytes(inputs) + out_bytes
    if impl == "compiled":
        # every variant compiles the same lambda code object: past Dynamo's recompile limit it would run eager
        torch._dynamo.reset()
        fn = torch.compile(fn, dynamic=False)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run, fwd_bytes
    leaves = [x.detach().clone().requires_grad_(i in grad_idx) if torch.is_tensor(x) else x
              for i, x in enumerate(inputs)]
    with torch.no_grad():
        grads = [torch.randn_like(o) for o in fn(*leaves)]

    def run():
        for i in grad_idx:
            leaves[i].grad = None
        torch.autograd.backward(list(fn(*leaves)), grads)
    return run, fwd_bytes + out_bytes + 2 * nbytes(inputs[i] for i in grad_idx)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op_name", list(OPS))
def test_op(benchmark, op_name, shape, mode, impl, device):
    benchmark.group = f"{op_name} {mode} {shape} {device}"
    benchmark.extra_info.update(op=op_name, shape=shape, mode=mode, impl=impl, device=device, **SHAPES[shape])
    run, moved = make_runner(op_name, impl, shape, device, mode)

    def timed():
        run()
        sync(device)

    for _ in range(3):  # warm-up: compilation, allocator, caches
        timed()
    if device == "cuda":  # kernel timings without a warm L2: overwrite it before every round
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)

        def flush_l2():
            flush.zero_()

        benchmark.pedantic(timed, setup=flush_l2, rounds=30, iterations=1, warmup_rounds=2)
        # the figure that counts on a GPU: CUDA events around the kernels, no host sync in the span
        median = cuda_event_median_s(run, setup=flush_l2)
        benchmark.extra_info["cuda_event_median_s"] = median
    else:
        benchmark.pedantic(timed, rounds=30, iterations=1, warmup_rounds=2)
        median = benchmark.stats.stats.median
    benchmark.extra_info.update(bytes=moved, gb_per_s=moved / median / 1e9)
