"""flow_interpolate and flow_matching_loss: kernels against references, the convention, gradients,
opcheck, compile and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, LOW_PRECISION, assert_close_to_gold, devices_with, run_with_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3o_fast import ops
from blip3o_fast.ops import reference

fused = ops.select(True)


def flow_inputs(B, S, C, dtype, device, seed=0, weighted=True):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(B, S, C, generator=g).to(device, dtype)
    x0 = torch.randn(B, S, C, generator=g).to(device, dtype)
    v = (0.7 * (x1.float() - x0.float()) + 0.5 * torch.randn(B, S, C, generator=g).to(device)).to(dtype)
    per_sample = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.rand(B, generator=g).to(device, per_sample)
    w = (torch.rand(B, generator=g) + 0.5).to(device, per_sample) if weighted else None
    return v, x1, x0, t, w


SHAPES = [(4, 16, 32), (1, 1, 1), (3, 37, 770), (2, 257, 1024), (5, 2, 3)]


@pytest.mark.parametrize("device,dtype", devices_with([torch.float64] + LOW_PRECISION))
@pytest.mark.parametrize("shape", SHAPES)
def test_interpolate_matches_reference(device, dtype, shape):
    _, x1, x0, t, _ = flow_inputs(*shape, dtype, device)
    grad = torch.randn(shape, device=device)
    fn = lambda impl: (lambda a, b, c: impl.flow_interpolate(a, b, c))
    outs, grads = run_with_grads(fn(fused), (x1, x0, t), [grad], [0, 1])
    ref_outs, ref_grads = run_with_grads(fn(reference), (x1, x0, t), [grad], [0, 1])
    gold_outs, gold_grads = run_with_grads(fn(reference), (x1.double(), x0.double(), t.double()), [grad], [0, 1])
    assert outs[0].dtype == dtype
    for name, a, r, g in zip(["x_t", "dx1", "dx0"], outs + grads, ref_outs + ref_grads, gold_outs + gold_grads):
        assert_close_to_gold(a, r, g, name)


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_interpolate_backward_computes_only_requested_grads(need):
    _, x1, x0, t, _ = flow_inputs(2, 5, 7, torch.float64, "cpu")
    grad = torch.randn(2, 5, 7, dtype=torch.float64)
    a, b = x1.clone().requires_grad_(need[0]), x0.clone().requires_grad_(need[1])
    fused.flow_interpolate(a, b, t).backward(grad)
    tt = t[:, None, None]
    if need[0]:
        torch.testing.assert_close(a.grad, tt * grad)
        assert b.grad is None
    else:
        torch.testing.assert_close(b.grad, (1 - tt) * grad)
        assert a.grad is None
    d1, d0 = torch.ops.blip3o_fast.flow_interpolate_bwd(grad, t, *need)
    assert (d1.numel() > 0, d0.numel() > 0) == need


def test_cpu_bfloat16_rounding_is_torchs():
    """The CPU kernels' own bf16 loads and stores (vectorisable shifts, not c10's conversions) round to
    nearest even exactly as torch does, for every bf16 bit pattern: NaN, infinities, subnormals, ties."""
    grad = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(1, 256, 256)
    for t in (1.0, 0.3, 1e-3, 0.999):
        tt = torch.tensor([t])
        d1, d0 = torch.ops.blip3o_fast.flow_interpolate_bwd(grad, tt, True, True)
        for got, want in ((d1, (tt * grad.float()).bfloat16()), (d0, ((1 - tt) * grad.float()).bfloat16())):
            nan = want.isnan()
            assert torch.equal(got.isnan(), nan)
            assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), t


def test_interpolate_convention():
    """t = 0 is pure noise, t = 1 is data."""
    _, x1, x0, _, _ = flow_inputs(3, 4, 5, torch.float32, "cpu")
    torch.testing.assert_close(fused.flow_interpolate(x1, x0, torch.zeros(3)), x0)
    torch.testing.assert_close(fused.flow_interpolate(x1, x0, torch.ones(3)), x1)
    half = fused.flow_interpolate(x1, x0, torch.full((3,), 0.25))
    torch.testing.assert_close(half, 0.75 * x0 + 0.25 * x1)


def loss_compare(inputs, with_target_grads=False):
    grad_inputs = [0, 1, 2] if with_target_grads else [0]
    device = inputs[0].device
    grads = [torch.tensor(1.3, device=device), torch.randn(inputs[0].shape[0]).to(device), None]  # both used
    fn = lambda impl: (lambda v, x1, x0, t, w: impl.flow_matching_loss(v, x1, x0, t, w))
    outs, dgrads = run_with_grads(fn(fused), inputs, grads, grad_inputs)
    ref_outs, ref_grads = run_with_grads(fn(reference), inputs, grads, grad_inputs)
    gold_in = [x.double() if x is not None else None for x in inputs]
    gold_outs, gold_grads = run_with_grads(fn(reference), gold_in, grads, grad_inputs)
    acc = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    assert all(o.dtype == acc for o in outs) and outs[0].dim() == 0
    names = ["loss", "per_sample_mse", "per_sample_cos", "dv", "dx1", "dx0"]
    for name, a, r, g in zip(names, outs + dgrads, ref_outs + ref_grads, gold_outs + gold_grads):
        assert_close_to_gold(a, r, g, name)


@pytest.mark.parametrize("device,dtype", devices_with([torch.float64] + LOW_PRECISION))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_loss_matches_reference(device, dtype, shape, weighted):
    loss_compare(flow_inputs(*shape, dtype, device, weighted=weighted))


@pytest.mark.parametrize("device", DEVICES)
def test_loss_target_grads_and_noncontiguous(device):
    v, x1, x0, t, w = flow_inputs(3, 10, 24, torch.float32, device)
    v_t = v.transpose(0, 1).contiguous().transpose(0, 1)  # same values, [S, B, C] storage
    x1_s = torch.cat([x1, x1], dim=-1)[..., ::2]  # strided last dim
    x1_s.copy_(x1)
    assert not (v_t.is_contiguous() or x1_s.is_contiguous())  # and run_with_grads keeps them so
    loss_compare((v_t, x1_s, x0, t, w), with_target_grads=True)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 5), S=st.integers(1, 30), C=st.integers(1, 100),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), weighted=st.booleans())
def test_random_shapes(B, S, C, dtype, weighted):
    loss_compare(flow_inputs(B, S, C, dtype, "cpu", weighted=weighted))


def test_loss_contract():
    """loss = Σ_b w_b·mean(v - (x1 - x0))² / B with no hidden constant; the velocity cosine is 1 for
    the exact velocity and the loss is 0."""
    v, x1, x0, t, w = flow_inputs(4, 8, 16, torch.float64, "cpu")
    loss, mse, cos = fused.flow_matching_loss(v, x1, x0, t, w)
    u = x1 - x0
    torch.testing.assert_close(mse, ((v - u) ** 2).mean(dim=(1, 2)))
    torch.testing.assert_close(loss, (w * mse).sum() / 4)
    loss, mse, cos = fused.flow_matching_loss(u, x1, x0, t, None)
    assert loss.item() == 0 and torch.allclose(cos, torch.ones(4, dtype=torch.float64))
    _, _, cos = fused.flow_matching_loss(-u, x1, x0, t, None)
    torch.testing.assert_close(cos, -torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    v, x1, x0, t, w = [x.requires_grad_(True) if i in (0, 1, 2, 4) else x
                       for i, x in enumerate(flow_inputs(2, 3, 5, torch.float64, device))]
    assert torch.autograd.gradcheck(lambda *a: fused.flow_matching_loss(*a)[:2], (v, x1, x0, t, w))
    assert torch.autograd.gradcheck(lambda *a: fused.flow_interpolate(*a), (x1, x0, t.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    v, x1, x0, t, w = flow_inputs(3, 5, 8, torch.float32, device)
    op = torch.ops.blip3o_fast
    torch.library.opcheck(op.flow_interpolate, (x1, x0, t))
    torch.library.opcheck(op.flow_interpolate, (x1.clone().requires_grad_(True), x0, t))
    torch.library.opcheck(op.flow_interpolate_bwd, (x1, t))
    torch.library.opcheck(op.flow_interpolate_bwd, (x1, t, True, False))
    torch.library.opcheck(op.flow_interpolate_bwd, (x1, t, False, True))
    torch.library.opcheck(op.flow_matching_loss, (v, x1, x0, t, w))
    torch.library.opcheck(op.flow_matching_loss, (v.clone().requires_grad_(True), x1, x0, t, None))
    torch.library.opcheck(op.flow_matching_loss_bwd, (w, v, x1, x0))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    v, x1, x0, t, w = flow_inputs(3, 5, 8, torch.float32, device)
    layer = torch.nn.Linear(8, 8).to(device)

    def train_loss(x1, x0, t):
        x_t = fused.flow_interpolate(x1, x0, t)
        loss, _, cos = fused.flow_matching_loss(layer(x_t), x1, x0, t, None)
        return loss, cos

    compiled = torch.compile(train_loss, fullgraph=True, backend="aot_eager")
    eager_loss, eager_cos = train_loss(x1, x0, t)
    eager_loss.backward()
    eager_grad = layer.weight.grad.clone()
    layer.weight.grad = None
    loss, cos = compiled(x1, x0, t)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(cos, eager_cos)
    torch.testing.assert_close(layer.weight.grad, eager_grad)


def test_bad_inputs():
    v, x1, x0, t, w = flow_inputs(3, 5, 8, torch.float32, "cpu")
    op = torch.ops.blip3o_fast
    with pytest.raises(RuntimeError, match=r"v must be 3-D \[B, S, C\]"):
        op.flow_matching_loss(v[0], x1, x0, t, w)
    with pytest.raises(RuntimeError, match="x0 must have the shape of v"):
        op.flow_matching_loss(v, x1, x0[:, :2], t, w)
    with pytest.raises(RuntimeError, match="v and x1 must have the same dtype"):
        op.flow_matching_loss(v, x1.double(), x0, t, w)
    with pytest.raises(RuntimeError, match=r"t must have shape \[B\] = \[3\]"):
        op.flow_matching_loss(v, x1, x0, t[:2], w)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[B\]"):
        op.flow_matching_loss(v, x1, x0, t, w[:, None])
    with pytest.raises(RuntimeError, match="at least one sample"):
        op.flow_matching_loss(v[:0], x1[:0], x0[:0], t[:0], None)
    with pytest.raises(RuntimeError, match=r"t must have shape \[B\]"):
        op.flow_interpolate(x1, x0, t[:, None])
    with pytest.raises(RuntimeError, match="x0 must have the shape of x1"):
        op.flow_interpolate(x1, x0[..., :3], t)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_mixed_devices():
    v, x1, x0, t, w = flow_inputs(2, 3, 4, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="must be on the same device"):
        torch.ops.blip3o_fast.flow_interpolate(x1, x0.cpu(), t)
    with pytest.raises(RuntimeError, match="must be on the same device"):
        torch.ops.blip3o_fast.flow_matching_loss(v, x1, x0, t, w.cpu())
