"""Flow matching (docs/architecture.md §3.1, §3.8): timestep samplers, the loss wiring (same x0 as the input), the
ODE samplers' time convention on exact velocity fields, guidance, global heads, and learning."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from blip3o_fast.config import FlowConfig, ModelConfig, TaskConfig
from blip3o_fast.data import read_head
from blip3o_fast.errors import UserError
from blip3o_fast.model import DiT, flow
from blip3o_fast.model.head import GlobalHead, global_embedding
from blip3o_fast.ops import reference

TASK = TaskConfig(cond_dim=24, target_dim=16, grid=(3, 4), target_cls=True)


# -- timesteps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,mean,var",
    [
        (FlowConfig(timestep_sampling="uniform"), 0.5, 1 / 12),
        (FlowConfig(timestep_sampling="beta", beta_a=2.0, beta_b=5.0), 2 / 7, 10 / (49 * 8)),
        (FlowConfig(timestep_sampling="beta", beta_a=0.5, beta_b=0.5), 0.5, 1 / 8),  # shape < 1 path
        (FlowConfig(timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0), 0.5, None),
    ],
)
def test_timestep_samplers_have_their_distribution(cfg, mean, var):
    n = 200_000
    t = flow.sample_timesteps(n, cfg, torch.Generator().manual_seed(0), "cpu")
    assert t.shape == (n,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() <= 1
    assert abs(t.mean().item() - mean) < 4e-3
    if var is not None:
        assert abs(t.var().item() - var) < 4e-3
    else:  # sigmoid(N(0, 1)): median 1/2, P(t < sigmoid(1)) = Φ(1)
        assert abs((t < torch.sigmoid(torch.tensor(1.0))).float().mean().item() - 0.8413) < 4e-3


def test_logit_normal_mean_shifts_t():
    t = flow.sample_timesteps(50_000, FlowConfig(logit_mean=1.0), torch.Generator().manual_seed(0), "cpu")
    assert abs(t.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 5e-3


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "beta"])
def test_timesteps_come_only_from_the_generator(kind):
    cfg = FlowConfig(timestep_sampling=kind, beta_a=0.7, beta_b=3.0)
    torch.manual_seed(123)  # the global RNG must not matter
    a = flow.sample_timesteps(64, cfg, torch.Generator().manual_seed(5), "cpu")
    torch.manual_seed(456)
    b = flow.sample_timesteps(64, cfg, torch.Generator().manual_seed(5), "cpu")
    c = flow.sample_timesteps(64, cfg, torch.Generator().manual_seed(6), "cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_timestep_grid(shift):
    grid = flow.timestep_grid(10, shift)
    assert len(grid) == 11 and grid[0] == 0.0 and grid[-1] == 1.0
    assert all(a < b for a, b in zip(grid, grid[1:]))
    uniform = [i / 10 for i in range(11)]
    # shift > 1 lingers near the noise end (t = 0): every t is earlier than on the uniform grid
    assert all((g <= u + 1e-12) if shift >= 1 else (g >= u - 1e-12) for g, u in zip(grid, uniform))
    if shift == 1.0:
        assert grid == pytest.approx(uniform, abs=1e-15)


# -- samplers on exact velocity fields ------------------------------------------------------------


class Field(nn.Module):
    """A stand-in model with a known velocity field v(x, t) (cond ignored unless told)."""

    def __init__(self, fn, task=TASK):
        super().__init__()
        self.task = task
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))  # sets the sampling dtype
        self.fn = fn
        self.calls = []

    def forward(self, x, t, cond, drop_cond=None):
        self.calls.append(t.clone())
        return self.fn(x, t, cond, drop_cond)


def noise_and_data(batch=2, seed=7):
    shape = (batch, TASK.target_tokens, TASK.target_dim)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x1 = torch.randn(shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    cond = torch.zeros(batch, TASK.cond_tokens, TASK.cond_dim, dtype=torch.float64)
    return x0, x1, cond


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_samplers_carry_noise_to_data_along_the_straight_path(sampler, shift):
    """v = x1 - x0 (the loss's target): x(t) = (1 - t)·x0 + t·x1 exactly, so x(1) = x1."""
    x0, x1, cond = noise_and_data()
    model = Field(lambda x, t, c, d: (x1 - x0).expand_as(x))
    out = flow.sample(model, cond, steps=5, sampler=sampler, timestep_shift=shift,
                      generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, x1, rtol=0, atol=1e-12)
    # time runs from noise (0) to data (1)
    ts = torch.stack([c[0] for c in model.calls]).tolist()
    assert ts[0] == 0.0 and all(a <= b for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_follows_the_conditional_field_to_its_target(shift):
    """v(x, t) = (x1 - x)/(1 - t), the field whose flow is the straight line to x1: Euler is exact."""
    x0, x1, cond = noise_and_data()
    model = Field(lambda x, t, c, d: (x1 - x) / (1 - t)[:, None, None])
    out = flow.sample(model, cond, steps=4, timestep_shift=shift, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, x1, rtol=0, atol=1e-12)


def test_heun_is_second_order_where_euler_is_not():
    """v = 2t·(x1 - x0), path x0 + t²·(x1 - x0): Heun (trapezoid) is exact, Euler lags by u/steps."""
    x0, x1, cond = noise_and_data()
    model = Field(lambda x, t, c, d: 2 * t[:, None, None] * (x1 - x0))
    for sampler, steps in (("heun", 3), ("euler", 4)):
        out = flow.sample(model, cond, steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(7))
        if sampler == "heun":
            torch.testing.assert_close(out, x1, rtol=0, atol=1e-12)
        else:
            torch.testing.assert_close(out, x1 - (x1 - x0) / steps, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_guidance_combines_conditional_and_null_velocities(scale):
    """v_cond = a, v_null = b (constant): the sample moves by b + g·(a - b)."""
    x0, _, cond = noise_and_data()
    a, b = 1.5, -0.5

    def fn(x, t, c, drop):
        v = torch.full_like(x, a)
        if drop is not None:
            v[drop] = b
        return v

    out = flow.sample(Field(fn), cond, steps=3, guidance_scale=scale, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, x0 + b + scale * (a - b), rtol=0, atol=1e-12)


def test_sample_with_a_dit_respects_shape_dtype_and_generator():
    model = DiT(ModelConfig(hidden_size=32, depth=1, num_heads=2, fused_ops=False), TASK).eval()
    cond = torch.randn(2, TASK.cond_tokens, TASK.cond_dim)
    out = flow.sample(model, cond, steps=2, generator=torch.Generator().manual_seed(3))
    # a new model has v = 0: the sample is the initial noise
    x0 = torch.randn(2, TASK.target_tokens, TASK.target_dim, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, x0, rtol=0, atol=0)
    assert flow.sample(model.double(), cond, steps=1, target_shape=(2, 13, 16)).dtype == torch.float64
    with pytest.raises(UserError, match="x_t"):
        flow.sample(model, cond, steps=1, target_shape=(2, 12, 16))
    with pytest.raises(UserError, match="sampler"):
        flow.sample(model, cond, steps=2, sampler="dpm")


# -- the training loss ----------------------------------------------------------------------------


class Oracle(nn.Module):
    """Knows the clean target: v = (x1 - x_t)/(1 - t), which equals x1 - x0 iff x_t was built from x0."""

    def __init__(self, x1, task=TASK, cond_drop=0.0, fused_ops=False):
        super().__init__()
        self.task, self.x1 = task, x1
        self.config = ModelConfig(hidden_size=32, num_heads=2, fused_ops=fused_ops, cond_drop=cond_drop)
        self.w = nn.Parameter(torch.ones((), dtype=x1.dtype))
        self.drops = []

    def forward(self, x_t, t, cond, drop_cond=None):
        self.drops.append(drop_cond)
        return self.w * (self.x1 - x_t) / (1 - t)[:, None, None]


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_loss_regresses_onto_the_velocity_of_the_same_noise(fused):
    x1 = torch.randn(4, TASK.target_tokens, TASK.target_dim, dtype=torch.float64)
    cond = torch.randn(4, TASK.cond_tokens, TASK.cond_dim)
    model = Oracle(x1, fused_ops=fused)
    loss, metrics = flow.training_loss(model, x1, cond, FlowConfig(), torch.Generator().manual_seed(0))
    assert loss.item() < 1e-20  # a different noise sample for the loss would give ~2
    assert metrics["velocity_cos"].item() == pytest.approx(1.0, abs=1e-12)
    assert set(metrics) == {"mse", "velocity_cos"} and not metrics["mse"].requires_grad


def test_loss_draws_noise_time_and_drop_from_the_generator_in_order():
    x1 = torch.randn(6, TASK.target_tokens, TASK.target_dim, dtype=torch.float64)
    cond = torch.randn(6, TASK.cond_tokens, TASK.cond_dim)
    model = Oracle(torch.zeros_like(x1), cond_drop=0.5)  # v = -x_t/(1 - t): the loss sees x0 and t
    cfg = FlowConfig(timestep_sampling="uniform")
    loss, metrics = flow.training_loss(model, x1, cond, cfg, torch.Generator().manual_seed(11))

    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(x1.shape, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g).double()
    drop = torch.rand(6, generator=g) < 0.5
    v = -reference.flow_interpolate(x1, x0, t) / (1 - t)[:, None, None]
    want, mse, _ = reference.flow_matching_loss(v, x1, x0, t)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["mse"], mse.mean())
    assert torch.equal(model.drops[0], drop) and 0 < drop.sum() < 6
    model.eval()  # no condition dropping outside training
    flow.training_loss(model, x1, cond, cfg, torch.Generator().manual_seed(11))
    assert model.drops[-1] is None


def test_loss_weights_samples():
    x1 = torch.randn(3, TASK.target_tokens, TASK.target_dim, dtype=torch.float64)
    cond = torch.randn(3, TASK.cond_tokens, TASK.cond_dim)
    model = Oracle(torch.zeros_like(x1))
    weight = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    cfg = FlowConfig(timestep_sampling="uniform")
    loss, _ = flow.training_loss(model, x1, cond, cfg, torch.Generator().manual_seed(0), weight=weight)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(x1.shape, generator=g, dtype=torch.float64)
    t = torch.rand(3, generator=g).double()
    v = -reference.flow_interpolate(x1, x0, t) / (1 - t)[:, None, None]
    per_sample = (v - (x1 - x0)).pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(loss, (weight * per_sample).sum() / 3, rtol=1e-12, atol=0)


def test_cls_loss_weight_adds_the_cls_tokens_own_weighted_error():
    """loss = the plain mean + w·(per-sample weighted) mean of the CLS token's squared velocity error."""
    x1 = torch.randn(3, TASK.target_tokens, TASK.target_dim, dtype=torch.float64)
    cond = torch.randn(3, TASK.cond_tokens, TASK.cond_dim)
    model = Oracle(torch.zeros_like(x1))
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    cfg = FlowConfig(timestep_sampling="uniform", cls_loss_weight=3.0)
    loss, metrics = flow.training_loss(model, x1, cond, cfg, torch.Generator().manual_seed(0), weight=weight)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(x1.shape, generator=g, dtype=torch.float64)
    t = torch.rand(3, generator=g).double()
    v = -reference.flow_interpolate(x1, x0, t) / (1 - t)[:, None, None]
    err = (v - (x1 - x0)).pow(2)
    want = (weight * err.mean(dim=(1, 2))).sum() / 3 + 3.0 * (weight * err[:, 0].mean(-1)).sum() / 3
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["cls_mse"], err[:, 0].mean(-1).mean())
    assert "cls_mse" not in flow.training_loss(model, x1, cond, replace(cfg, cls_loss_weight=0.0),
                                               torch.Generator().manual_seed(0))[1]


def test_cls_loss_weight_without_a_target_cls_is_a_one_line_error():
    from blip3o_fast.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="task.target_cls") as err:
        RunConfig(task=TaskConfig(target_cls=False), flow=FlowConfig(cls_loss_weight=1.0))
    assert "\n" not in str(err.value)
    no_cls = replace(TASK, target_cls=False)
    x1 = torch.randn(2, no_cls.target_tokens, no_cls.target_dim)
    model = Oracle(x1)
    model.task = no_cls
    with pytest.raises(UserError, match="target_cls"):
        flow.training_loss(model, x1, torch.randn(2, 12, 24), FlowConfig(cls_loss_weight=1.0), None)


def test_loss_rejects_a_target_that_does_not_fit_the_task():
    x1 = torch.randn(2, TASK.target_tokens - 1, TASK.target_dim)
    with pytest.raises(UserError, match="target") as err:
        flow.training_loss(Oracle(x1), x1, torch.randn(2, 12, 24), FlowConfig(), None)
    assert "\n" not in str(err.value)


def test_contrastive_term_is_off_by_default_and_adds_infonce_when_on():
    torch.manual_seed(0)
    model = DiT(ModelConfig(hidden_size=32, depth=1, num_heads=2, fused_ops=False), TASK)
    with torch.no_grad():
        model.out_proj.weight.normal_(std=0.1)
    x1 = torch.randn(4, TASK.target_tokens, TASK.target_dim)
    cond = torch.randn(4, TASK.cond_tokens, TASK.cond_dim)
    head = GlobalHead(TASK.target_dim, 8)
    base, m0 = flow.training_loss(model, x1, cond, FlowConfig(), torch.Generator().manual_seed(0), head=head)
    assert "contrastive" not in m0
    cfg = FlowConfig(contrastive_weight=0.5, contrastive_temperature=0.1, head="cls")
    total, m1 = flow.training_loss(model, x1, cond, cfg, torch.Generator().manual_seed(0), head=head)
    assert m1["contrastive"].item() > 0
    torch.testing.assert_close(total, base + 0.5 * m1["contrastive"], rtol=1e-6, atol=1e-6)
    total.backward()
    assert model.out_proj.weight.grad.abs().sum() > 0


def test_infonce_is_low_for_matched_and_high_for_shuffled_embeddings():
    e = F.normalize(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    matched = flow.contrastive_loss(e, e, 0.05)
    shuffled = flow.contrastive_loss(e, e.roll(1, 0), 0.05)
    assert matched < 0.1 and shuffled > math.log(16)


# -- global heads ---------------------------------------------------------------------------------


def test_global_head_from_a_head_file_is_clips_head(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "post_layernorm.weight": 1 + 0.1 * torch.randn(16, generator=g),
        "post_layernorm.bias": 0.1 * torch.randn(16, generator=g),
        "visual_projection.weight": torch.randn(8, 16, generator=g),
    }
    save_file(tensors, tmp_path / "head.safetensors", metadata={"layer_norm_eps": "1e-05"})
    weights = read_head(tmp_path / "head.safetensors")
    head = GlobalHead.from_weights(weights.tensors, weights.layer_norm_eps)
    assert not any(p.requires_grad for p in head.parameters())
    assert head.post_layernorm.eps == 1e-5
    tokens = torch.randn(3, TASK.target_tokens, 16, generator=g)
    ln = F.layer_norm(tokens, (16,), tensors["post_layernorm.weight"], tensors["post_layernorm.bias"], 1e-5)
    proj = ln @ tensors["visual_projection.weight"].T
    cls = global_embedding(tokens, head, "cls", has_cls=True)
    torch.testing.assert_close(cls, F.normalize(proj[:, 0], dim=-1))
    mean = global_embedding(tokens, head, "mean", has_cls=True)  # CLS excluded from the mean
    pooled = F.layer_norm(tokens[:, 1:].mean(1), (16,), tensors["post_layernorm.weight"],
                          tensors["post_layernorm.bias"], 1e-5)
    torch.testing.assert_close(mean, F.normalize(pooled @ tensors["visual_projection.weight"].T, dim=-1))
    assert torch.allclose(mean.norm(dim=-1), torch.ones(3))
    with pytest.raises(UserError, match="target_cls"):
        global_embedding(tokens[:, 1:], head, "cls", has_cls=False)


# -- fused ----------------------------------------------------------------------------------------


def test_fused_training_loss_matches_reference():
    torch.manual_seed(0)
    task = replace(TASK, target_cls=False)
    ref = DiT(ModelConfig(hidden_size=32, depth=2, num_heads=2, fused_ops=False), task)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = DiT(ModelConfig(hidden_size=32, depth=2, num_heads=2, fused_ops=True), task)
    fused.load_state_dict(ref.state_dict())
    x1 = torch.randn(4, task.target_tokens, task.target_dim)
    cond = torch.randn(4, task.cond_tokens, task.cond_dim)
    out = []
    for model in (ref, fused):
        loss, metrics = flow.training_loss(model, x1, cond, FlowConfig(), torch.Generator().manual_seed(3))
        loss.backward()
        out.append((loss, metrics, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1][1]["velocity_cos"], out[0][1]["velocity_cos"], rtol=1e-4, atol=1e-5)
    for name, grad in out[0][2].items():
        torch.testing.assert_close(out[1][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# -- learning -------------------------------------------------------------------------------------


def synthetic_pairs(task: TaskConfig, n: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n (cond, target) pairs with a position-dependent nonlinear relation; target CLS = mean patch."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(n, task.cond_tokens, task.cond_dim, generator=g)
    mix = torch.randn(task.cond_dim, task.target_dim, generator=g) / math.sqrt(task.cond_dim)
    pos = torch.randn(task.cond_tokens, task.target_dim, generator=g)
    patches = 2 * torch.tanh(cond @ mix + 0.5 * pos)
    if task.target_cls:
        patches = torch.cat((patches.mean(1, keepdim=True), patches), dim=1)
    return cond, patches


STEPS = 300  # the sampled cosine passes 0.95 near step 250


@pytest.fixture
def one_thread():
    """One intra-op thread: ~25 s here instead of ~15 s on two idle cores, but immune to the 20x
    stalls two OpenMP threads suffer when another job holds one of the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_tiny_model_overfits_eight_pairs(fused, one_thread):
    """The check the prior projects failed (they plateaued near 0.25): sampled outputs reach per-patch
    cosine >= 0.95 with their targets within 300 steps (~25 s on one idle core). The time is printed, not
    asserted: wall clock on a shared machine is not the code's property (a CI run under load average 8 took
    165 s); speed goals live in bench/."""
    task = TaskConfig(cond_dim=64, target_dim=32, grid=(8, 8), target_cls=True)  # the demo's dims
    cond, target = synthetic_pairs(task)
    torch.manual_seed(0)
    model = DiT(ModelConfig(hidden_size=128, depth=4, num_heads=4, fused_ops=fused, cond_drop=0.0), task)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    cfg = FlowConfig()
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for _ in range(STEPS):
        loss, _ = flow.training_loss(model, target, cond, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    sample = flow.sample(model, cond, steps=20, generator=torch.Generator().manual_seed(2))
    cos = F.cosine_similarity(sample, target, dim=-1).mean(1).mean().item()  # over tokens, then pairs
    elapsed = time.perf_counter() - start
    print(f"per-patch cosine {cos:.4f} after {STEPS} steps in {elapsed:.1f}s (final loss {loss.item():.4f})")
    assert cos >= 0.95
