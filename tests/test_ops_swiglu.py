"""swiglu: the kernel against its reference, the polynomial exponential, gradients, opcheck, compile, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, LOW_PRECISION, assert_close_to_gold, devices_with, run_with_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3o_fast import ops
from blip3o_fast.ops import reference

fused = ops.select(True)


def check(ab):
    grad = torch.randn(*ab.shape[:-1], ab.shape[-1] // 2).to(ab.device)
    outs, grads = run_with_grads(fused.swiglu, (ab,), [grad], [0])
    ref_outs, ref_grads = run_with_grads(reference.swiglu, (ab,), [grad], [0])
    gold_outs, gold_grads = run_with_grads(reference.swiglu, (ab.double(),), [grad], [0])
    assert outs[0].dtype == ab.dtype and outs[0].is_contiguous()
    assert_close_to_gold(outs[0], ref_outs[0], gold_outs[0], "out")
    assert_close_to_gold(grads[0], ref_grads[0], gold_grads[0], "grad_ab")


@pytest.mark.parametrize("device,dtype", devices_with([torch.float64] + LOW_PRECISION))
@pytest.mark.parametrize("shape", [(4, 65, 768), (1, 1, 2), (3, 37, 770), (7, 2 * 1365), (2, 3, 5, 8)])
def test_matches_reference(device, dtype, shape):
    check((3 * torch.randn(shape)).to(device, dtype))


def test_large_and_tiny_inputs_stay_finite_and_exact():
    """silu's tails: exp saturates instead of overflowing, and silu(a) -> a, 0 at the extremes."""
    a = torch.tensor([-1e4, -200.0, -88.5, -30.0, -1e-3, 0.0, 1e-3, 30.0, 88.5, 200.0, 1e4])
    ab = torch.cat([a, torch.ones_like(a)])[None]
    out = fused.swiglu(ab)
    torch.testing.assert_close(out, reference.swiglu(ab), rtol=1e-6, atol=1e-6)
    grad = torch.ops.blip3o_fast.swiglu_bwd(torch.ones(1, 11), ab)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, torch.func.vjp(reference.swiglu, ab)[1](torch.ones(1, 11))[0], rtol=1e-5,
                               atol=1e-6)


def test_noncontiguous_input():
    ab = torch.randn(6, 10, 3).transpose(0, 2)  # [3, 10, 6], last dim strided
    assert not ab.is_contiguous()
    check(ab)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 50), half=st.integers(1, 300), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_random_shapes(rows, half, dtype):
    check((2 * torch.randn(rows, 2 * half)).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    ab = torch.randn(3, 4, 10, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(fused.swiglu, (ab,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    ab = torch.randn(2, 5, 16, device=device)
    torch.library.opcheck(torch.ops.blip3o_fast.swiglu, (ab,))
    torch.library.opcheck(torch.ops.blip3o_fast.swiglu, (ab.clone().requires_grad_(True),))
    torch.library.opcheck(torch.ops.blip3o_fast.swiglu_bwd, (torch.randn(2, 5, 8, device=device), ab))
    layer = torch.nn.Linear(16, 16).to(device)
    fn = lambda x: fused.swiglu(layer(x)).square().sum()
    eager = fn(ab)
    eager.backward()
    expected = layer.weight.grad.clone()
    layer.weight.grad = None
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(ab)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(layer.weight.grad, expected)


def test_bad_inputs():
    op = torch.ops.blip3o_fast
    with pytest.raises(RuntimeError, match="ab's last dim must be even"):
        op.swiglu(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="ab must be float32, float64"):
        op.swiglu(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"grad must have shape \[3, 2\]"):
        op.swiglu_bwd(torch.randn(3, 4), torch.randn(3, 4))
