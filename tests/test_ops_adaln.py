"""adaln_modulate and gated_residual_adaln: kernels against references, gradients, opcheck, compile,
determinism and errors, for LayerNorm and RMSNorm."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, LOW_PRECISION, assert_close_to_gold, devices_with, run_with_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3o_fast import ops
from blip3o_fast.ops import reference

fused = ops.select(True)
EPS = 1e-6
NORMS = ["layer", "rms"]


def make_params(B, C, dtype, device, g, count=3, sliced=True):
    """count [B, C] parameters; sliced=True takes them as column slices of one [B, count*C] projection
    (what `adaLN_modulation(c).chunk(...)` gives: non-contiguous rows)."""
    if sliced:
        p = (0.5 * torch.randn(B, count * C, generator=g)).to(device, dtype)
        return [p[:, i * C:(i + 1) * C] for i in range(count)]
    return [(0.5 * torch.randn(B, C, generator=g)).to(device, dtype) for _ in range(count)]


def modulate_inputs(B, S, C, dtype, device, seed=0, sliced=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, S, C, generator=g) * 2 + 0.5).to(device, dtype)
    shift, scale = make_params(B, C, dtype, device, g, 2, sliced)
    return x, shift, scale


def gated_inputs(B, S, C, dtype, device, seed=0, sliced=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, S, C, generator=g) * 2 + 0.5).to(device, dtype)
    y = torch.randn(B, S, C, generator=g).to(device, dtype)
    gate, shift, scale = make_params(B, C, dtype, device, g, 3, sliced)
    return x, y, gate, shift, scale


def compare(fused_fn, ref_fn, inputs, grad_inputs, n_diff_outputs, names):
    """Outputs and gradients of fused_fn vs ref_fn (same dtype) vs ref_fn in float64 (gold)."""
    g = torch.Generator().manual_seed(1)
    like = inputs[0]
    grads = [torch.randn(like.shape, generator=g).to(like.device) for _ in range(n_diff_outputs)]
    grads += [None] * 2  # mean and rstd carry no gradient
    outs, dgrads = run_with_grads(fused_fn, inputs, grads, grad_inputs)
    ref_outs, ref_grads = run_with_grads(ref_fn, inputs, grads, grad_inputs)
    gold_outs, gold_grads = run_with_grads(ref_fn, [x.double() for x in inputs], grads, grad_inputs)
    for o, r in zip(outs, ref_outs):
        assert o.dtype == r.dtype and o.shape == r.shape
    for name, a, r, gd in zip(names, outs + dgrads, ref_outs + ref_grads, gold_outs + gold_grads):
        assert_close_to_gold(a, r, gd, name)


def modulate_fn(impl, norm):
    return lambda x, shift, scale: impl.adaln_modulate(x, shift, scale, EPS, norm)


def gated_fn(impl, norm):
    return lambda x, y, gate, shift, scale: impl.gated_residual_adaln(x, y, gate, shift, scale, EPS, norm)


MOD_NAMES = ["y", "mean", "rstd", "dx", "dshift", "dscale"]
GATED_NAMES = ["x_new", "h", "mean", "rstd", "dx", "dy", "dgate", "dshift", "dscale"]

SHAPES = [(2, 16, 64), (1, 1, 1), (3, 37, 770), (2, 257, 768), (4, 1, 33), (1, 13, 2)]


@pytest.mark.parametrize("device,dtype", devices_with([torch.float64] + LOW_PRECISION))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", NORMS)
def test_modulate_matches_reference(device, dtype, shape, norm):
    inputs = modulate_inputs(*shape, dtype, device)
    compare(modulate_fn(fused, norm), modulate_fn(reference, norm), inputs, [0, 1, 2], 1, MOD_NAMES)


@pytest.mark.parametrize("device,dtype", devices_with([torch.float64] + LOW_PRECISION))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", NORMS)
def test_gated_matches_reference(device, dtype, shape, norm):
    inputs = gated_inputs(*shape, dtype, device)
    compare(gated_fn(fused, norm), gated_fn(reference, norm), inputs, [0, 1, 2, 3, 4], 2, GATED_NAMES)


@pytest.mark.parametrize("device,dtype", devices_with([torch.float32, torch.bfloat16]))
@pytest.mark.parametrize("norm", NORMS)
def test_noncontiguous(device, dtype, norm):
    B, S, C = 3, 11, 40
    g = torch.Generator().manual_seed(3)
    x = torch.randn(S, B, C, generator=g).to(device, dtype).transpose(0, 1)  # [B, S, C] view of [S, B, C]
    y = torch.randn(B, S, 2 * C, generator=g).to(device, dtype)[..., ::2]  # strided last dim
    gate, shift, scale = [p.t() for p in make_params(C, B, dtype, device, g, 3, sliced=False)]  # transposed
    assert not (x.is_contiguous() or y.is_contiguous() or shift.is_contiguous())
    compare(gated_fn(fused, norm), gated_fn(reference, norm), (x, y, gate, shift, scale), [0, 1, 2, 3, 4], 2,
            GATED_NAMES)
    compare(modulate_fn(fused, norm), modulate_fn(reference, norm), (x, shift, scale), [0, 1, 2], 1, MOD_NAMES)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), S=st.integers(1, 40), C=st.integers(1, 200), norm=st.sampled_from(NORMS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), sliced=st.booleans())
def test_random_shapes(B, S, C, norm, dtype, sliced):
    compare(gated_fn(fused, norm), gated_fn(reference, norm), gated_inputs(B, S, C, dtype, "cpu", sliced=sliced),
            [0, 1, 2, 3, 4], 2, GATED_NAMES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck(device, norm):
    x, y, gate, shift, scale = [t.clone().requires_grad_(True) for t in gated_inputs(2, 5, 7, torch.float64, device)]
    assert torch.autograd.gradcheck(lambda *a: modulate_fn(fused, norm)(*a)[0], (x, shift, scale))
    assert torch.autograd.gradcheck(lambda *a: gated_fn(fused, norm)(*a)[:2], (x, y, gate, shift, scale))


def test_rms_statistics():
    x, shift, scale = modulate_inputs(2, 3, 8, torch.float32, "cpu")
    _, mean, rstd = fused.adaln_modulate(x, shift, scale, EPS, "rms")
    assert mean.numel() == 0 and rstd.shape == (2, 3) and rstd.dtype == torch.float32
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + EPS))


def test_deterministic_parameter_grads():
    """Column sums over S are done without atomics: repeated backward passes agree bit for bit, and
    so do runs with a different thread count."""
    inputs = gated_inputs(4, 300, 96, torch.float32, "cpu")
    grads = [torch.randn(4, 300, 96), torch.randn(4, 300, 96)]

    def run():
        return run_with_grads(gated_fn(fused, "layer"), inputs, grads + [None, None], [0, 1, 2, 3, 4])[1]

    first = run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, run(), single):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
def test_opcheck(device, norm):
    x, y, gate, shift, scale = gated_inputs(2, 5, 24, torch.float32, device)
    ops_ = torch.ops.blip3o_fast
    torch.library.opcheck(ops_.adaln_modulate, (x, shift, scale, EPS, norm))
    leaves = [t.clone().requires_grad_(True) for t in (x, y, gate, shift, scale)]
    torch.library.opcheck(ops_.adaln_modulate, (leaves[0], leaves[3], leaves[4], EPS, norm))
    torch.library.opcheck(ops_.gated_residual_adaln, (*leaves, EPS, norm))
    x_new, h, mean, rstd = ops_.gated_residual_adaln(x, y, gate, shift, scale, EPS, norm)
    torch.library.opcheck(ops_.adaln_modulate_bwd, (h, x, scale, mean, rstd, norm))
    torch.library.opcheck(ops_.gated_residual_adaln_bwd, (x, h, x_new, y, gate, scale, mean, rstd, norm))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    inputs = gated_inputs(2, 6, 16, torch.float32, device)

    def block_seam(x, y, gate, shift, scale):
        x_new, h, _, _ = fused.gated_residual_adaln(x, y, gate, shift, scale, EPS, "layer")
        out, _, _ = fused.adaln_modulate(h, shift, scale, EPS, "rms")
        return (x_new * out).sum()

    compiled = torch.compile(block_seam, fullgraph=True, backend="aot_eager")
    eager_leaves = [t.clone().requires_grad_(True) for t in inputs]
    compiled_leaves = [t.clone().requires_grad_(True) for t in inputs]
    torch.testing.assert_close(compiled(*compiled_leaves), block_seam(*eager_leaves))
    block_seam(*eager_leaves).backward()
    compiled(*compiled_leaves).backward()
    for a, b in zip(eager_leaves, compiled_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_bad_inputs():
    x, y, gate, shift, scale = gated_inputs(2, 5, 8, torch.float32, "cpu")
    op = torch.ops.blip3o_fast
    with pytest.raises(RuntimeError, match=r"x must be 3-D \[B, S, C\]"):
        op.adaln_modulate(x[0], shift, scale, EPS, "layer")
    with pytest.raises(RuntimeError, match=r"shift must have shape \[B, C\] = \[2, 8\]"):
        op.adaln_modulate(x, shift[:, :4], scale, EPS, "layer")
    with pytest.raises(RuntimeError, match=r"scale must have shape \[B, C\]"):
        op.adaln_modulate(x, shift, scale[:1], EPS, "layer")
    with pytest.raises(RuntimeError, match='norm must be "layer" or "rms", got "batch"'):
        op.adaln_modulate(x, shift, scale, EPS, "batch")
    with pytest.raises(RuntimeError, match="x and shift must have the same dtype"):
        op.adaln_modulate(x, shift.double(), scale, EPS, "layer")
    with pytest.raises(RuntimeError, match="y must have the shape of x"):
        op.gated_residual_adaln(x, y[:, :3], gate, shift, scale, EPS, "rms")
    with pytest.raises(RuntimeError, match=r"gate must have shape \[B, C\]"):
        op.gated_residual_adaln(x, y, gate[:, :3], shift, scale, EPS, "rms")
    with pytest.raises(RuntimeError, match="x must be float32, float64"):
        op.adaln_modulate(x.int(), shift.int(), scale.int(), EPS, "layer")


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_mixed_devices():
    x, y, gate, shift, scale = gated_inputs(2, 5, 8, torch.float32, "cuda")
    op = torch.ops.blip3o_fast
    with pytest.raises(RuntimeError, match="x and shift must be on the same device"):
        op.adaln_modulate(x, shift.cpu(), scale, EPS, "layer")
    with pytest.raises(RuntimeError, match="must be on the same device"):
        op.gated_residual_adaln(x, y.cpu(), gate, shift, scale, EPS, "rms")
    _, mean, rstd = op.adaln_modulate(x, shift, scale, EPS, "layer")
    with pytest.raises(RuntimeError, match="x and mean must be on the same device"):
        op.adaln_modulate_bwd(x, x, scale, mean.cpu(), rstd, "layer")
