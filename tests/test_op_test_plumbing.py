"""The op tests' own plumbing, checked without a GPU: every tensor their helpers build follows the inputs'
device, and the leaves they differentiate keep the inputs' strides. The device check runs the real test
bodies on the `meta` device (the ops' fake kernels), where a helper that builds a CPU tensor fails the
same way it would on CUDA ("invalid gradient ... expected device"), here rather than in a short GPU slot."""

from __future__ import annotations

import conftest
import pytest
import test_ops_adaln
import test_ops_flow_loss
import test_ops_qk_norm_rope
import test_ops_rope3d
import test_ops_swiglu
import torch

MODULES = (test_ops_adaln, test_ops_flow_loss, test_ops_qk_norm_rope, test_ops_rope3d, test_ops_swiglu)
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.fixture
def on_meta(monkeypatch):
    """The gold comparison reads values, which meta tensors lack: it checks devices and shapes instead and
    counts its calls (a test body that compares nothing would pass vacuously)."""
    names = []

    def compare(out, ref_lowp, gold, name="output", factor=2.0):
        for side in (out, ref_lowp, gold):
            assert side is None or side.device.type == "meta", f"{name} is on {side.device}"
        if out is not None:
            assert out.shape == gold.shape, name
        names.append(name)

    for module in MODULES:
        monkeypatch.setattr(module, "assert_close_to_gold", compare)
    return names


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_helpers_follow_the_device(on_meta, dtype):
    test_ops_swiglu.test_matches_reference("meta", dtype, (3, 37, 770))
    assert on_meta == ["out", "grad_ab"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_helpers_follow_the_device(on_meta, dtype):
    test_ops_flow_loss.test_interpolate_matches_reference("meta", dtype, (3, 37, 770))
    for weighted in (True, False):
        test_ops_flow_loss.test_loss_matches_reference("meta", dtype, (3, 37, 770), weighted)
    test_ops_flow_loss.test_loss_target_grads_and_noncontiguous("meta")
    assert len(on_meta) == 3 + 2 * 4 + 6


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_helpers_follow_the_device(on_meta, dtype):
    for norm in test_ops_adaln.NORMS:
        test_ops_adaln.test_modulate_matches_reference("meta", dtype, (3, 37, 770), norm)
        test_ops_adaln.test_gated_matches_reference("meta", dtype, (3, 37, 770), norm)
    assert len(on_meta) == 2 * (6 + 9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_helpers_follow_the_device(on_meta, dtype):
    test_ops_rope3d.test_matches_reference("meta", dtype, (2, 16, 4, 65, 4, 64))
    test_ops_qk_norm_rope.test_matches_reference("meta", dtype, (2, 16, 4, 65, 4, 64))
    assert len(on_meta) == 4 + 8


def test_leaves_keep_the_input_strides():
    """A "non-contiguous" test must hand the kernel the view itself, not a contiguous copy of it."""
    qkv = torch.randn(2, 5, 3, 4, 8)
    q = qkv[:, :, 0]  # what the fused qkv projection gives: stride over S is 3C
    assert not q.is_contiguous()
    seen = []

    def record(x):
        seen.append(x.stride())
        return x * 2

    _, grads = conftest.run_with_grads(record, (q,), [torch.ones(q.shape)], [0])
    assert seen == [q.stride()]
    torch.testing.assert_close(grads[0], torch.full(q.shape, 2.0))
