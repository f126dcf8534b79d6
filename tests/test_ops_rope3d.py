"""rope3d: the compiled kernel against its reference, gradients, properties, opcheck, compile, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, LOW_PRECISION, assert_close_to_gold, devices_with, run_with_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3o_fast import ops
from blip3o_fast.ops import reference, rope_tables

fused = ops.select(True)
OP = torch.ops.blip3o_fast.rope3d


def tables(S, D, dtype=torch.float32, device="cpu", p_t=0, offset=0):
    """Tables of S tokens at positions (p_t, s // 7 + offset, s % 7 + offset): any positions work."""
    pos = torch.stack((torch.full((S,), p_t), torch.arange(S) // 7 + offset, torch.arange(S) % 7 + offset), 1)
    ang = rope_tables.angles(pos, rope_tables.default_sections(D))
    return ang.cos().to(device, dtype), ang.sin().to(device, dtype)


def make_inputs(B, Sq, Hq, Sk, Hk, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, Hq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Sk, Hk, D, generator=g).to(device, dtype)
    tab = torch.float64 if dtype == torch.float64 else torch.float32
    return (q, k, *tables(Sq, D, tab, device), *tables(Sk, D, tab, device, p_t=1))


def check_against_reference(inputs):
    q, k = inputs[:2]
    grads = [torch.randn_like(q, dtype=torch.float32), torch.randn_like(k, dtype=torch.float32)]
    outs, dgrads = run_with_grads(fused.rope3d, inputs, grads, [0, 1])
    ref_outs, ref_grads = run_with_grads(reference.rope3d, inputs, grads, [0, 1])
    gold_in = [x.double() for x in inputs]
    gold_outs, gold_grads = run_with_grads(reference.rope3d, gold_in, grads, [0, 1])
    assert all(o.dtype == q.dtype and o.is_contiguous() for o in outs)
    for name, a, r, g in zip(["q", "k", "dq", "dk"], outs + dgrads, ref_outs + ref_grads, gold_outs + gold_grads):
        assert_close_to_gold(a, r, g, name)


SHAPES = [
    (2, 16, 4, 16, 4, 64),  # self-attention
    (2, 16, 4, 65, 4, 64),  # cross-attention: k longer than q (CLS + 64)
    (1, 1, 1, 1, 1, 2),  # smallest: B = S = H = 1, D = 2
    (3, 37, 3, 5, 1, 10),  # prime S, H = 1 on k, D = 10
    (2, 257, 12, 256, 12, 64),  # the real sequence lengths
]


@pytest.mark.parametrize("device,dtype", devices_with([torch.float64] + LOW_PRECISION))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(device, dtype, shape):
    check_against_reference(make_inputs(*shape, dtype, device))


@pytest.mark.parametrize("device", DEVICES)
def test_float64_exact(device):
    inputs = make_inputs(2, 9, 3, 7, 2, 12, torch.float64, device)
    for a, b in zip(fused.rope3d(*inputs), reference.rope3d(*inputs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,dtype", devices_with([torch.float32, torch.bfloat16]))
def test_noncontiguous_views(device, dtype):
    B, S, H, D = 2, 11, 3, 16
    qkv = torch.randn(B, S, 3, H, D).to(device, dtype)  # a fused qkv projection, viewed per head
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    assert not q.is_contiguous()
    _, _, *tabs = make_inputs(B, S, H, S, H, D, dtype, device)
    check_against_reference((q, k, *tabs))
    # [S, B, H, D] storage seen as [B, S, H, D]; and a non-unit stride in the head dim (copied)
    qt = torch.randn(S, B, H, D).to(device, dtype).transpose(0, 1)
    kd = torch.randn(B, S, H, 2 * D).to(device, dtype)[..., ::2]
    check_against_reference((qt, kd, *tabs))


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), Sq=st.integers(1, 20), Sk=st.integers(1, 20), Hq=st.integers(1, 4),
    Hk=st.integers(1, 4), half=st.integers(1, 12), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_random_shapes(B, Sq, Sk, Hq, Hk, half, dtype):
    check_against_reference(make_inputs(B, Sq, Hq, Sk, Hk, 2 * half, dtype, "cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    q, k, *tabs = make_inputs(2, 5, 2, 4, 3, 6, torch.float64, device)
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: fused.rope3d(a, b, *tabs), (q, k))


@pytest.mark.parametrize("device", DEVICES)
def test_norm_preserving_and_relative(device):
    """A rotation keeps every pair's norm, and <R(p)q, R(p')k> depends only on p - p'."""
    D = 64
    q, k, *_ = make_inputs(1, 30, 2, 30, 2, D, torch.float64, device)
    cq, sq = tables(30, D, torch.float64, device, offset=0)
    ck, sk = tables(30, D, torch.float64, device, p_t=1, offset=0)
    rq, rk = fused.rope3d(q, k, cq, sq, ck, sk)
    pair_norm = lambda x: x.unflatten(-1, (D // 2, 2)).norm(dim=-1)
    torch.testing.assert_close(pair_norm(rq), pair_norm(q))
    scores = torch.einsum("bshd,bthd->bhst", rq, rk)
    # shift every position of both streams by the same offset on all three axes
    cq2, sq2 = tables(30, D, torch.float64, device, offset=5)
    ck2, sk2 = tables(30, D, torch.float64, device, p_t=1, offset=5)
    rows = torch.arange(30)
    pos_t = lambda p_t: torch.stack((torch.full((30,), p_t + 3), rows // 7 + 5, rows % 7 + 5), 1)
    ang_q = rope_tables.angles(pos_t(0), rope_tables.default_sections(D))
    ang_k = rope_tables.angles(pos_t(1), rope_tables.default_sections(D))
    rq2, rk2 = fused.rope3d(q, k, ang_q.cos().to(device), ang_q.sin().to(device), ang_k.cos().to(device),
                            ang_k.sin().to(device))
    torch.testing.assert_close(torch.einsum("bshd,bthd->bhst", rq2, rk2), scores)
    rq3, rk3 = fused.rope3d(q, k, cq2, sq2, ck2, sk2)
    torch.testing.assert_close(torch.einsum("bshd,bthd->bhst", rq3, rk3), scores)


def test_tables_follow_the_spec():
    assert rope_tables.default_sections(64) == (16, 24, 24)
    cos, sin = ops.rope3d_tables((4, 5), 64, cls=True, cls_t=-1)
    assert cos.shape == (21, 32) and cos.dtype == torch.float32
    # token n of the grid (after CLS) sits at (0, n // 5, n % 5); the w-axis angles start at 8 + 12
    n = 13
    h, w = n // 5, n % 5
    expect_h = h * 10000.0 ** (-torch.arange(0, 24, 2, dtype=torch.float64) / 24)
    expect_w = w * 10000.0 ** (-torch.arange(0, 24, 2, dtype=torch.float64) / 24)
    torch.testing.assert_close(cos[1 + n, 8:20].double(), expect_h.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[1 + n, 20:].double(), expect_w.sin(), atol=1e-6, rtol=0)
    torch.testing.assert_close(cos[1 + n, :8], torch.ones(8))  # p_t = 0
    # CLS at (-1, 0, 0): only the t axis turns
    expect_t = -1 * 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(sin[0, :8].double(), expect_t.sin(), atol=1e-6, rtol=0)
    assert ops.rope3d_tables((4, 5), 64, cls=True, cls_t=-1)[0] is cos  # cached
    with pytest.raises(ValueError, match="summing to the head dim 64"):
        ops.rope3d_tables((4, 4), 64, sections=(16, 16, 16))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, k, *tabs = make_inputs(2, 5, 2, 7, 3, 8, torch.float32, device)
    torch.library.opcheck(OP, (q, k, *tabs))
    torch.library.opcheck(OP, (q.requires_grad_(True), k.requires_grad_(True), *tabs))
    torch.library.opcheck(torch.ops.blip3o_fast.rope3d_bwd, (q.detach(), k.detach(), *tabs))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    q, k, *tabs = make_inputs(2, 6, 2, 6, 2, 8, torch.float32, device)

    def step(q, k):
        rq, rk = fused.rope3d(q, k, *tabs)
        return (rq * rk).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    qa, ka = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    qb, kb = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    step(qa, ka).backward()
    compiled(qb, kb).backward()
    torch.testing.assert_close(qa.grad, qb.grad)
    torch.testing.assert_close(kb.grad, ka.grad)


BAD = [
    (lambda q, k, cq, sq, ck, sk: (q[0], k, cq, sq, ck, sk), "q must be 4-D"),
    (lambda q, k, cq, sq, ck, sk: (q[..., :7], k[..., :7], cq[:, :3], sq[:, :3], ck[:, :3], sk[:, :3]),
     "head dim D must be even"),
    (lambda q, k, cq, sq, ck, sk: (q, k, cq[:3], sq, ck, sk), r"cos_q must have shape \[S, D/2\]"),
    (lambda q, k, cq, sq, ck, sk: (q, k, cq, sq, ck, sk[:, :2]), r"sin_k must have shape \[S, D/2\]"),
    (lambda q, k, cq, sq, ck, sk: (q, k.double(), cq, sq, ck, sk), "q and k must have the same dtype"),
    (lambda q, k, cq, sq, ck, sk: (q, k, cq.double(), sq, ck, sk), "cos_q must be Float"),
    (lambda q, k, cq, sq, ck, sk: (q.int(), k.int(), cq, sq, ck, sk), "q must be float32, float64"),
]


@pytest.mark.parametrize("mutate,message", BAD)
def test_bad_inputs(mutate, message):
    inputs = make_inputs(2, 5, 2, 5, 2, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=message):
        OP(*mutate(*inputs))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_mixed_devices():
    q, k, *tabs = make_inputs(2, 5, 2, 5, 2, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="must be on the same device"):
        OP(q, k.cuda(), *tabs)
