"""qk_norm_rope3d (RMSNorm of each head vector with a weight, then RoPE-3D): the compiled kernel against
its reference, gradients, properties, determinism, opcheck, compile, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, LOW_PRECISION, assert_close_to_gold, devices_with, run_with_grads
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops_rope3d import SHAPES as ROPE_SHAPES
from test_ops_rope3d import tables

from blip3o_fast import ops
from blip3o_fast.ops import reference

fused = ops.select(True)
OP = torch.ops.blip3o_fast.qk_norm_rope3d
EPS = 1e-6


def make_inputs(B, Sq, Hq, Sk, Hk, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (3 * torch.randn(B, Sq, Hq, D, generator=g)).to(device, dtype)  # norms far from 1: the norm matters
    k = (0.2 * torch.randn(B, Sk, Hk, D, generator=g)).to(device, dtype)
    wq = (1 + 0.5 * torch.randn(D, generator=g)).to(device, dtype)
    wk = (1 + 0.5 * torch.randn(D, generator=g)).to(device, dtype)
    tab = torch.float64 if dtype == torch.float64 else torch.float32
    return (q, k, wq, wk, EPS, *tables(Sq, D, tab, device), *tables(Sk, D, tab, device, p_t=1))


def check_against_reference(inputs):
    q, k = inputs[:2]
    grads = [torch.randn_like(q, dtype=torch.float32), torch.randn_like(k, dtype=torch.float32)]
    outs, dgrads = run_with_grads(fused.qk_norm_rope3d, inputs, grads, [0, 1, 2, 3])
    ref_outs, ref_grads = run_with_grads(reference.qk_norm_rope3d, inputs, grads, [0, 1, 2, 3])
    gold_in = [x.double() if torch.is_tensor(x) else x for x in inputs]
    gold_outs, gold_grads = run_with_grads(reference.qk_norm_rope3d, gold_in, grads, [0, 1, 2, 3])
    assert all(o.dtype == q.dtype and o.is_contiguous() for o in outs[:2])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    assert outs[2].dtype == acc and outs[2].shape == q.shape[:3] and outs[3].shape == k.shape[:3]
    names = ["q", "k", "rstd_q", "rstd_k", "dq", "dk", "dweight_q", "dweight_k"]
    for name, a, r, g in zip(names, outs + dgrads, ref_outs + ref_grads, gold_outs + gold_grads):
        assert_close_to_gold(a, r, g, name)


# rope3d's shapes, head dims that take more than one pair per lane of a CUDA warp up to the largest, and
# more rows than the CPU backward's 4096 partials of 64 rows (its chunks grow)
SHAPES = ROPE_SHAPES + [(2, 9, 2, 9, 2, 130), (1, 3, 1, 2, 1, 512), (33, 257, 32, 1, 1, 2)]


@pytest.mark.parametrize("device,dtype", devices_with([torch.float64] + LOW_PRECISION))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(device, dtype, shape):
    check_against_reference(make_inputs(*shape, dtype, device))


@pytest.mark.parametrize("device", DEVICES)
def test_float64_exact(device):
    inputs = make_inputs(2, 9, 3, 7, 2, 12, torch.float64, device)
    for a, b in zip(fused.qk_norm_rope3d(*inputs), reference.qk_norm_rope3d(*inputs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,dtype", devices_with([torch.float32, torch.bfloat16]))
def test_noncontiguous_views(device, dtype):
    B, S, H, D = 2, 11, 3, 16
    _, _, wq, wk, eps, *tabs = make_inputs(B, S, H, S, H, D, dtype, device)
    qkv = torch.randn(B, S, 3, H, D).to(device, dtype)  # a fused qkv projection, viewed per head
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    assert not q.is_contiguous()
    check_against_reference((q, k, wq, wk, eps, *tabs))
    # [S, B, H, D] storage seen as [B, S, H, D]; a non-unit stride in the head dim; a strided weight
    qt = torch.randn(S, B, H, D).to(device, dtype).transpose(0, 1)
    kd = torch.randn(B, S, H, 2 * D).to(device, dtype)[..., ::2]
    w_strided = torch.randn(2 * D).to(device, dtype)[::2]
    check_against_reference((qt, kd, w_strided, wk, eps, *tabs))


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), Sq=st.integers(1, 20), Sk=st.integers(1, 20), Hq=st.integers(1, 4),
    Hk=st.integers(1, 4), half=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_random_shapes(B, Sq, Sk, Hq, Hk, half, dtype):
    check_against_reference(make_inputs(B, Sq, Hq, Sk, Hk, 2 * half, dtype, "cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    q, k, wq, wk, eps, *tabs = make_inputs(2, 5, 2, 4, 3, 6, torch.float64, device)
    leaves = [t.requires_grad_(True) for t in (q, k, wq, wk)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: fused.qk_norm_rope3d(a, b, c, d, eps, *tabs)[:2], leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_is_scale_invariant_rms_norm_then_rotation(device):
    """Each output head vector has the norm of w·x̂ (RoPE is a rotation) and ignores the input's scale."""
    q, k, wq, wk, _, *tabs = make_inputs(2, 7, 3, 5, 2, 16, torch.float64, device)
    q_out, k_out, rstd_q, _ = fused.qk_norm_rope3d(q, k, wq, wk, 0.0, *tabs)
    xhat = q * q.pow(2).mean(-1, keepdim=True).rsqrt()
    torch.testing.assert_close(q_out.norm(dim=-1), (xhat * wq).norm(dim=-1))
    torch.testing.assert_close(rstd_q, q.pow(2).mean(-1).rsqrt())
    q2, k2, _, _ = fused.qk_norm_rope3d(7.5 * q, 0.01 * k, wq, wk, 0.0, *tabs)
    torch.testing.assert_close(q2, q_out)
    torch.testing.assert_close(k2, k_out)


def test_weight_gradient_is_deterministic_across_thread_counts():
    inputs = make_inputs(4, 65, 4, 64, 4, 32, torch.float32, "cpu")
    grads = [torch.randn(4, 65, 4, 32), torch.randn(4, 64, 4, 32)]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(run_with_grads(fused.qk_norm_rope3d, inputs, grads, [0, 1, 2, 3])[1])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, k, wq, wk, eps, *tabs = make_inputs(2, 5, 2, 7, 3, 8, torch.float32, device)
    torch.library.opcheck(OP, (q, k, wq, wk, eps, *tabs))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, wq, wk)]
    torch.library.opcheck(OP, (*leaves, eps, *tabs))
    _, _, rq, rk = OP(q, k, wq, wk, eps, *tabs)
    torch.library.opcheck(torch.ops.blip3o_fast.qk_norm_rope3d_bwd, (q, k, q, k, wq, wk, rq, rk, *tabs))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    q, k, wq, wk, eps, *tabs = make_inputs(2, 6, 2, 6, 2, 8, torch.float32, device)

    def step(q, k, wq, wk):
        rq, rk, _, _ = fused.qk_norm_rope3d(q, k, wq, wk, eps, *tabs)
        return (rq * rk).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_in = [t.clone().requires_grad_(True) for t in (q, k, wq, wk)]
    compiled_in = [t.clone().requires_grad_(True) for t in (q, k, wq, wk)]
    step(*eager_in).backward()
    compiled(*compiled_in).backward()
    for a, b in zip(eager_in, compiled_in):
        torch.testing.assert_close(a.grad, b.grad)


BAD = [
    (lambda q, k, wq, wk: (q, k, wq[:5], wk), r"weight_q must have shape \[D\] = \[8\]"),
    (lambda q, k, wq, wk: (q, k, wq, wk.double()), "k and weight_k must have the same dtype"),
    (lambda q, k, wq, wk: (q, k, wq, wk[None]), r"weight_k must have shape \[D\]"),
    (lambda q, k, wq, wk: (q[0], k, wq, wk), "q must be 4-D"),
]


@pytest.mark.parametrize("mutate,message", BAD)
def test_bad_inputs(mutate, message):
    q, k, wq, wk, eps, *tabs = make_inputs(2, 5, 2, 5, 2, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=message):
        OP(*mutate(q, k, wq, wk), eps, *tabs)


@pytest.mark.parametrize("D,message", [(514, "head dims up to 512, got D=514"), (0, "needs a head dim D > 0")])
def test_head_dim_limits_are_named(D, message):
    q, k = torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D)
    w, tab = torch.ones(D), torch.ones(2, D // 2)
    with pytest.raises(RuntimeError, match=message):
        OP(q, k, w, w, EPS, tab, tab, tab, tab)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_mixed_devices():
    q, k, wq, wk, eps, *tabs = make_inputs(2, 5, 2, 5, 2, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="must be on the same device"):
        OP(q, k, wq.cuda(), wk, eps, *tabs)
