"""The emulated CUDA kernels on what the existing op tests do not reach: strided views that really
get to the kernels (the tests' leaves are clones, which makes slices contiguous), both rope3d paths,
empty tensors, grid-stride loops and grids past 65535 rows. Leaves here are the full projections;
the views are taken inside the differentiated function, as the model does."""

from __future__ import annotations

import pytest
import torch
from conftest import LOW_PRECISION, assert_close_to_gold
from test_ops_rope3d import tables

from blip3o_fast import ops
from blip3o_fast.ops import reference

fused = ops.select(True)
simt = torch.ops.blip3o_fast_simt


@pytest.fixture(autouse=True)
def _emulator_defaults():
    simt.launches()  # drop what earlier tests launched
    yield
    simt.set_schedules(3)
    simt.set_block_sample(0)
    simt.set_sm_count(2)


def compare(fn, leaves, n_grad_outputs=1, seed=1):
    """fn(impl, *leaves) -> outputs; fused vs reference (same dtype) vs reference in float64, outputs and
    the gradients of every leaf."""
    g = torch.Generator().manual_seed(seed)

    def run(impl, dtype=None):
        xs = [x.detach().to(dtype or x.dtype).requires_grad_(True) for x in leaves]
        outs = fn(impl, *xs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return outs, xs

    outs, xs = run(fused)
    grads = [torch.randn(o.shape, generator=g) for o in outs[:n_grad_outputs]]
    torch.autograd.backward(list(outs[:n_grad_outputs]), [gr.to(o.dtype) for gr, o in zip(grads, outs)])
    ref, rxs = run(reference)
    torch.autograd.backward(list(ref[:n_grad_outputs]), [gr.to(o.dtype) for gr, o in zip(grads, ref)])
    gold, gxs = run(reference, torch.float64)
    torch.autograd.backward(list(gold[:n_grad_outputs]), [gr.double() for gr in grads])
    for i, (o, r, gd) in enumerate(zip(outs, ref, gold)):
        assert_close_to_gold(o.detach(), r.detach(), gd.detach(), f"output {i}")
    for i, (x, r, gd) in enumerate(zip(xs, rxs, gxs)):
        assert_close_to_gold(x.grad, r.grad, gd.grad, f"grad of leaf {i}")
    return simt.launches()


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_q_and_k_as_slices_of_a_fused_qkv_projection(dtype, qk_norm):
    B, S, H, D = 2, 5, 3, 16
    qkv = torch.randn(B, S, 3 * H * D).to(dtype)
    tq, tk = tables(S, D), tables(S, D, p_t=1)
    wq, wk = (1 + 0.1 * torch.randn(D)).to(dtype), (1 + 0.1 * torch.randn(D)).to(dtype)

    def fn(impl, qkv, wq, wk):
        q, k, _ = qkv.view(B, S, 3, H, D).unbind(2)  # row stride 3·H·D: views, not copies
        assert q.stride() == (S * 3 * H * D, 3 * H * D, D, 1) and not q.is_contiguous()
        if qk_norm:
            return impl.qk_norm_rope3d(q, k, wq, wk, 1e-6, *tq, *tk)[:2]
        return impl.rope3d(q, k, *tq, *tk)

    launched = compare(fn, [qkv, wq, wk], n_grad_outputs=2)
    if not qk_norm:
        assert "rope3d_kernel<vector>" in launched  # strides of 3·H·D elements keep 16-byte vectors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["misaligned", "odd_pairs", "aligned"])
def test_rope3d_vector_and_scalar_paths(dtype, case):
    B, S, H = 2, 3, 2
    D = {"misaligned": 16, "odd_pairs": 6 if dtype == torch.float32 else 12, "aligned": 16}[case]
    offset = 1 if case == "misaligned" else 0
    flat = torch.randn(B * S * H * D + offset).to(dtype)
    tq = tables(S, D)

    def fn(impl, flat):
        q = flat[offset:].view(B, S, H, D)  # offset by one element: the pointer is not 16-byte aligned
        return impl.rope3d(q, q * 2, *tq, *tq)

    launched = compare(fn, [flat], n_grad_outputs=2)
    want = "rope3d_kernel<vector>" if case == "aligned" else "rope3d_kernel<scalar>"
    assert launched[0] == want, launched  # the forward; the backward's gradients are fresh, aligned tensors


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_parameters_as_column_slices_and_transposed_x(dtype, norm):
    B, S, C = 3, 7, 72
    x_t = (torch.randn(S, B, C) * 2 + 0.5).to(dtype)
    y = torch.randn(B, S, C).to(dtype)
    proj = (0.5 * torch.randn(B, 3 * C)).to(dtype)  # adaLN_modulation(c): gate | shift | scale

    def fn(impl, x_t, y, proj):
        gate, shift, scale = proj.split(C, dim=1)  # row stride 3C
        assert shift.stride() == (3 * C, 1)
        x_new, h, _, _ = impl.gated_residual_adaln(x_t.transpose(0, 1), y, gate, shift, scale, 1e-6, norm)
        out, _, _ = impl.adaln_modulate(h, shift, scale, 1e-6, norm)
        return x_new, out

    launched = compare(fn, [x_t, y, proj], n_grad_outputs=2)
    assert {"adaln forward_kernel", "adaln backward_rows_kernel", "adaln backward_columns_kernel"} <= set(launched)


def test_swiglu_on_a_strided_view_and_flow_ops_striding_the_grid():
    simt.set_sm_count(1)  # at most 32 blocks of 256 threads: 9600 elements take two turns of the loops
    ab = torch.randn(40, 2, 30)

    def fn(impl, ab):
        return impl.swiglu(ab.transpose(0, 1))

    assert compare(fn, [ab]) == ["swiglu forward_kernel", "swiglu backward_kernel"]
    x1, x0 = torch.randn(2, 40, 3, 80).unbind(0)  # [B=40, S=3, C=80]
    v_sb = torch.randn(3, 40, 80)  # v is its transposed view [B, S, C]
    t, w = torch.rand(40), torch.rand(40)  # constants: the fused ops differentiate v, x1 and x0 only

    def loss(impl, v_sb, x1, x0):
        x_t = impl.flow_interpolate(x1, x0, t)
        return impl.flow_matching_loss(v_sb.transpose(0, 1) * x_t, x1, x0, t, w)[0]

    launched = compare(loss, [v_sb, x1, x0])
    assert {"flow loss_rows_kernel", "flow loss_finalize_kernel", "flow loss_bwd_kernel"} <= set(launched)


def test_qk_norm_backward_with_more_rows_than_its_grid():
    # 1024 blocks of 8 warps: 8320 rows make each warp take a second row, and the partials sum 1024 rows
    inputs = [torch.randn(2, 65, 64, 2), torch.randn(2, 3, 1, 2), torch.ones(2) * 1.1, torch.ones(2) * 0.9]
    tq, tk = tables(65, 2), tables(3, 2)

    def fn(impl, q, k, wq, wk):
        return impl.qk_norm_rope3d(q, k, wq, wk, 1e-6, *tq, *tk)[:2]

    simt.set_schedules(1)  # 266k emulated threads per launch: one schedule keeps it to seconds
    compare(fn, inputs, n_grad_outputs=2)


@pytest.mark.parametrize("shape", [(0, 4, 8), (2, 0, 8), (2, 3, 0)])
def test_empty_tensors(shape):
    x = torch.randn(shape)
    p = torch.randn(shape[0], shape[2])
    y, _, rstd = fused.adaln_modulate(x, p, p, 1e-6, "layer")
    assert y.shape == x.shape and rstd.shape == shape[:2]
    assert fused.swiglu(torch.randn(shape[0], 2 * shape[2])).shape == (shape[0], shape[2])
    q = torch.randn(shape[0], shape[1], 2, 4)
    assert fused.rope3d(q, q, *tables(shape[1], 4), *tables(shape[1], 4))[0].shape == q.shape
    assert fused.flow_interpolate(x, x, torch.rand(shape[0])).shape == x.shape


def test_adaln_backward_past_65535_rows_of_grid():
    """B > 65535: one block per (b, column tile) must not put B on grid.y (at most 65535)."""
    B, S, C = 65536 + 3, 1, 5
    simt.set_block_sample(4)  # emulate the first and last 4 blocks of each launch; every launch is checked whole
    simt.set_schedules(1)
    x, y = torch.randn(B, S, C), torch.randn(B, S, C)
    gate, shift, scale = torch.randn(3, B, C).unbind(0)
    x_new, h, mean, rstd = fused.gated_residual_adaln(x, y, gate, shift, scale, 1e-6, "layer")
    g_new, g_h = torch.randn(B, S, C), torch.randn(B, S, C)
    grads = torch.ops.blip3o_fast.gated_residual_adaln_bwd(g_new, g_h, x_new, y, gate, scale, mean, rstd, "layer")
    rows = torch.cat([torch.arange(4), torch.arange(B - 4, B)])  # the emulated rows
    leaves = [t[rows].clone().requires_grad_(True) for t in (x, y, gate, shift, scale)]
    ref = reference.gated_residual_adaln(*leaves, 1e-6, "layer")
    torch.autograd.backward([ref[0], ref[1]], [g_new[rows], g_h[rows]])
    torch.testing.assert_close(h[rows], ref[1].detach(), rtol=1e-5, atol=1e-5)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got[rows], leaf.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("C", [6144, 12288])
def test_adaln_rows_past_48k_of_shared_memory_opt_in(C):
    """fp32 rows of 48 KiB (the backward's two buffers at C=6144, the forward's one at C=12288) plus the
    kernels' static block-sum scratch pass the default limit: the launch must opt in."""
    simt.set_schedules(1)
    leaves = [torch.randn(1, 2, C), 0.5 * torch.randn(1, C), 0.5 * torch.randn(1, C)]

    def fn(impl, x, shift, scale):
        return impl.adaln_modulate(x, shift, scale, 1e-6, "layer")

    compare(fn, leaves)


def test_adaln_too_wide_for_the_device_is_one_line():
    x = torch.randn(1, 1, 60000)
    p = torch.zeros(1, 60000)
    with pytest.raises(RuntimeError, match=r"C=60000 is too wide for the CUDA AdaLN kernel \(at most 58080 channels"):
        fused.adaln_modulate(x, p, p, 1e-6, "rms")
