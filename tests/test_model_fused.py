"""The fused-op DiT against the same DiT on the ops' references (docs/architecture.md §3.7.5): outputs and every
parameter gradient, both tasks at their real feature dims, 256 and 257 target tokens."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from blip3o_fast.config import ModelConfig, TaskConfig
from blip3o_fast.model import DiT

TASKS = {
    "eva_to_clip": TaskConfig(name="eva_to_clip", cond_dim=4096, target_dim=1024, grid=(16, 16)),
    "clip_to_eva": TaskConfig(name="clip_to_eva", cond_dim=1024, target_dim=4096, grid=(16, 16)),
}
# fp32: the two paths round differently (fused reductions, float32 statistics either way), so errors are
# relative to each tensor's scale; float64 pins the math itself
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def randomized_pair(model_cfg: ModelConfig, task: TaskConfig, dtype: torch.dtype) -> tuple[DiT, DiT]:
    """(reference, fused) DiTs with the same random (not zero-init) weights."""
    ref = DiT(replace(model_cfg, fused_ops=False), task)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    fused = DiT(replace(model_cfg, fused_ops=True), task)
    fused.load_state_dict(ref.state_dict())
    return ref.to(dtype), fused.to(dtype)


def run(model: DiT, task: TaskConfig, dtype: torch.dtype, batch: int = 2, net=None):
    """(velocity, parameter grads) of one forward/backward of `net` (default: the model itself)."""
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(batch, task.target_tokens, task.target_dim, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype)
    cond = torch.randn(batch, task.cond_tokens, task.cond_dim, generator=g, dtype=dtype)
    drop = torch.tensor([False, True])[:batch]
    v = (net if net is not None else model)(x_t, t, cond, drop_cond=drop)
    probe = torch.randn(v.shape, generator=g, dtype=dtype)
    (v * probe).sum().backward()
    return v.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_close_scaled(actual, expected, tol, name):
    """max |a - e| <= tol · max(|e|max, 1e-3): a relative bound on the tensor's own scale."""
    err = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-3)
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} x scale {scale:.3g}"


@pytest.mark.parametrize("task_name", ["eva_to_clip", "clip_to_eva"])
@pytest.mark.parametrize("target_cls", [False, True], ids=["256", "257"])
def test_fused_model_matches_reference_fp32(task_name, target_cls):
    task = replace(TASKS[task_name], target_cls=target_cls)
    cfg = ModelConfig(hidden_size=64, depth=2, num_heads=2, attention="math")
    ref, fused = randomized_pair(cfg, task, torch.float32)
    v_ref, g_ref = run(ref, task, torch.float32)
    v_fused, g_fused = run(fused, task, torch.float32)
    assert v_fused.shape == (2, task.target_tokens, task.target_dim)
    assert_close_scaled(v_fused, v_ref, TOL[torch.float32], "velocity")
    for name, grad in g_ref.items():
        assert_close_scaled(g_fused[name], grad, TOL[torch.float32], name)


@pytest.mark.parametrize("mlp,norm,attention", [("swiglu", "layer", "sdpa"), ("gelu", "rms", "math")])
def test_fused_model_matches_reference_fp64(mlp, norm, attention):
    task = TaskConfig(cond_dim=48, target_dim=40, grid=(5, 6), target_cls=True, cond_cls=True)
    cfg = ModelConfig(hidden_size=48, depth=3, num_heads=2, mlp=mlp, norm=norm, attention=attention,
                      rope_sections=(4, 10, 10))
    ref, fused = randomized_pair(cfg, task, torch.float64)
    v_ref, g_ref = run(ref, task, torch.float64)
    v_fused, g_fused = run(fused, task, torch.float64)
    assert_close_scaled(v_fused, v_ref, TOL[torch.float64], "velocity")
    for name, grad in g_ref.items():
        assert_close_scaled(g_fused[name], grad, TOL[torch.float64], name)


def test_new_fused_model_predicts_exactly_zero_velocity():
    task = replace(TASKS["eva_to_clip"], target_cls=True)
    model = DiT(ModelConfig(hidden_size=64, depth=2, num_heads=2, fused_ops=True), task)
    v, _ = run(model, task, torch.float32)
    assert torch.equal(v, torch.zeros_like(v))


@pytest.mark.slow
def test_fused_model_compiles_fullgraph_and_matches_eager():
    """The fused ops inside torch.compile(fullgraph=True): no graph break, same outputs and gradients."""
    task = TaskConfig(cond_dim=24, target_dim=16, grid=(3, 4), target_cls=True)
    _, model = randomized_pair(ModelConfig(hidden_size=32, depth=2, num_heads=2), task, torch.float32)
    v_eager, g_eager = run(model, task, torch.float32)
    model.zero_grad(set_to_none=True)
    v_compiled, g_compiled = run(model, task, torch.float32, net=torch.compile(model, fullgraph=True, dynamic=False))
    assert_close_scaled(v_compiled, v_eager, 1e-5, "velocity")
    for name, grad in g_eager.items():
        assert_close_scaled(g_compiled[name], grad, 1e-4, name)
