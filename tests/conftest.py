"""Shared test helpers: devices, dtypes and the reference-comparison rule for the fused ops."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CUDA = torch.cuda.is_available()
# BLIP3O_FAST_COLLECT_CUDA=1 adds the cuda cases without a GPU, only for `--collect-only`: `make gpu-check-dry`
# counts what each pytest selection of the GPU run would select (running them here fails)
DEVICES = ["cpu"] + (["cuda"] if CUDA or os.environ.get("BLIP3O_FAST_COLLECT_CUDA") == "1" else [])
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]

# absolute slack added to the 2x rule, per dtype: covers outputs whose reference error is ~0
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def devices_with(dtypes):
    """Every (device, dtype) pair: CPU always, CUDA where a GPU is present (DEVICES), each dtype on each."""
    return [(d, t) for d in DEVICES for t in dtypes]


requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def assert_close_to_gold(out, ref_lowp, gold, name="output", factor=2.0):
    """flash-attention's rule: the fused result's error against a float64 reference (gold) is at most
    `factor` times the error of the plain PyTorch reference computed in the same low precision."""
    if out is None and gold is None:
        return
    assert out is not None and gold is not None, f"{name}: one side is missing"
    assert out.shape == gold.shape, f"{name}: shape {tuple(out.shape)} != {tuple(gold.shape)}"
    if gold.numel() == 0:
        return
    gold = gold.double()
    err = (out.double() - gold).abs().max().item()
    ref_err = (ref_lowp.double() - gold).abs().max().item()
    atol = ATOL.get(out.dtype if out.is_floating_point() else torch.float32, 1e-5)
    scale = max(1.0, gold.abs().max().item())
    assert err <= factor * ref_err + atol * scale, (
        f"{name}: fused error {err:.3g} > {factor} x reference error {ref_err:.3g} + {atol * scale:.3g}"
    )


def run_with_grads(fn, inputs, grad_outputs, grad_inputs):
    """Calls fn(*inputs) with fresh leaves for the inputs named by index in grad_inputs, backprops
    grad_outputs (moved to each output's device and dtype) into its floating outputs, and returns
    (outputs, grads). The leaves are the inputs themselves, detached: views keep their strides, so a
    non-contiguous input reaches the kernel as it is (clone() would hand it a contiguous copy)."""
    leaves = [x.detach().requires_grad_(True) if i in grad_inputs else x for i, x in enumerate(inputs)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g.to(device=o.device, dtype=o.dtype) for o, g in pairs])
    return [o.detach() for o in outs], [leaves[i].grad for i in grad_inputs]


def cast(x, dtype, device):
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
