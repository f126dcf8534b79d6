"""The fused ops on the very layouts the model hands them, which are views, not contiguous tensors: q and k of
the fused qkv projection (stride over S = 3C), the cross-attention k of the all-blocks K|V projection
(stride over S = depth·2C), AdaLN parameters as column chunks of the [B, 9H] modulation (row stride 9H).
Each must give, bit for bit, what the op gives on a contiguous copy (outputs and gradients), and match the
reference (the op files' rule)."""

from __future__ import annotations

import pytest
import test_ops_adaln
import test_ops_qk_norm_rope
import test_ops_rope3d
import torch
from conftest import devices_with, run_with_grads

from blip3o_fast import ops

fused = ops.select(True)
B, S, NC, H, D, DEPTH = 2, 13, 9, 3, 16, 4
C = H * D
EPS = 1e-6


def assert_bitwise_as_contiguous(fn, inputs, grad_inputs, n_grads):
    """fn on the views and on contiguous copies of them: equal outputs and input gradients, bit for bit."""
    g = torch.Generator().manual_seed(7)
    outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    grads = [torch.randn(o.shape, generator=g) for o in outs[:n_grads]] + [None] * (len(outs) - n_grads)
    got = run_with_grads(fn, inputs, grads, grad_inputs)
    dense = [x.contiguous() if torch.is_tensor(x) else x for x in inputs]
    want = run_with_grads(fn, dense, grads, grad_inputs)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def self_qk(device, dtype):
    qkv = torch.randn(B, S, 3 * C, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    q, k, _ = qkv.view(B, S, 3, H, D).unbind(2)  # as SelfAttention
    assert q.stride(1) == 3 * C and k.stride(1) == 3 * C and not q.is_contiguous()
    return q, k


def cross_qk(device, dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, S, H, D, generator=g).to(device, dtype)
    kv_all = torch.randn(B, NC, DEPTH * 2 * C, generator=g).to(device, dtype)
    kv = kv_all.unflatten(-1, (DEPTH, 2 * C)).unbind(2)[1]  # as DiT.forward, block 1
    k, _ = kv.unflatten(-1, (2, H, D)).unbind(2)  # as CrossAttention
    assert k.stride(1) == DEPTH * 2 * C and not k.is_contiguous()
    return q, k


def adaln_params(device, dtype, count):
    mod = torch.randn(B, 9 * C, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    params = mod.chunk(9, dim=1)[:count]  # as DiT.forward
    assert all(p.stride(0) == 9 * C and not p.is_contiguous() for p in params)
    return params


def tables(Sq, Sk, dtype, device):
    tab = torch.float64 if dtype == torch.float64 else torch.float32
    return (*test_ops_rope3d.tables(Sq, D, tab, device), *test_ops_rope3d.tables(Sk, D, tab, device, p_t=1))


CASES = devices_with([torch.float32, torch.bfloat16])


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("which", ["self", "cross"])
def test_qk_norm_rope3d_on_attention_views(device, dtype, which):
    q, k = (self_qk if which == "self" else cross_qk)(device, dtype)
    w = (1 + 0.5 * torch.randn(2, D, generator=torch.Generator().manual_seed(3))).to(device, dtype)
    inputs = (q, k, w[0], w[1], EPS, *tables(q.shape[1], k.shape[1], dtype, device))
    assert_bitwise_as_contiguous(fused.qk_norm_rope3d, inputs, [0, 1, 2, 3], 2)
    test_ops_qk_norm_rope.check_against_reference(inputs)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("which", ["self", "cross"])
def test_rope3d_on_attention_views(device, dtype, which):
    q, k = (self_qk if which == "self" else cross_qk)(device, dtype)
    inputs = (q, k, *tables(q.shape[1], k.shape[1], dtype, device))
    assert_bitwise_as_contiguous(fused.rope3d, inputs, [0, 1], 2)
    test_ops_rope3d.check_against_reference(inputs)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_on_modulation_chunks(device, dtype, norm):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, S, C, generator=g).to(device, dtype)
    y = torch.randn(B, S, C, generator=g).to(device, dtype)
    shift, scale, gate = adaln_params(device, dtype, 3)
    modulate = test_ops_adaln.modulate_fn(fused, norm)
    gated = test_ops_adaln.gated_fn(fused, norm)
    assert_bitwise_as_contiguous(modulate, (x, shift, scale), [0, 1, 2], 1)
    assert_bitwise_as_contiguous(gated, (x, y, gate, shift, scale), [0, 1, 2, 3, 4], 2)
    test_ops_adaln.compare(gated, test_ops_adaln.gated_fn(ops.reference, norm), (x, y, gate, shift, scale),
                           [0, 1, 2, 3, 4], 2, test_ops_adaln.GATED_NAMES)


@pytest.mark.parametrize("device,dtype", CASES)
def test_swiglu_on_a_strided_view(device, dtype):
    ab = torch.randn(B, S, 4 * C, generator=torch.Generator().manual_seed(5)).to(device, dtype)[..., ::2]
    assert not ab.is_contiguous()
    assert_bitwise_as_contiguous(fused.swiglu, (ab,), [0], 1)
