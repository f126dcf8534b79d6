"""Rectified flow matching (docs/architecture.md §3.1): timesteps, the training loss, ODE samplers.

One convention everywhere: t in [0, 1], t = 0 is noise x0 ~ N(0, I), t = 1 is data x1,
x_t = (1 - t)·x0 + t·x1, and the model regresses the velocity u = x1 - x0 of that very x0. Sampling
integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..config import FlowConfig
from ..errors import UserError
from .head import GlobalHead, global_embedding

# -- timesteps ------------------------------------------------------------------------------------


def _gamma(shape: float, n: int, generator: torch.Generator | None, device) -> Tensor:
    """Gamma(shape, 1) [n] float64 by Marsaglia-Tsang, drawing only from `generator` (torch's own
    Gamma sampler takes no generator, and the trainer must replay the stream on resume)."""
    k = shape + 1.0 if shape < 1.0 else shape  # Gamma(a) = Gamma(a + 1)·U^(1/a) for a < 1
    d = k - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.zeros(n, dtype=torch.float64, device=device)
    todo = torch.ones(n, dtype=torch.bool, device=device)
    while True:  # each round accepts > 95% of the candidates
        x = torch.randn(n, generator=generator, dtype=torch.float64, device=device)
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out = torch.where(ok & todo, d * v, out)
        todo &= ~ok
        if not bool(todo.any()):
            break
    if shape < 1.0:
        out = out * torch.rand(n, generator=generator, dtype=torch.float64, device=device) ** (1.0 / shape)
    return out


def sample_timesteps(batch: int, cfg: FlowConfig, generator: torch.Generator | None, device) -> Tensor:
    """Training times t [B] (float32) in [0, 1] from cfg.timestep_sampling, drawn from `generator`."""
    if cfg.timestep_sampling == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if cfg.timestep_sampling == "logit_normal":
        z = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
    if cfg.timestep_sampling == "beta":
        a = _gamma(cfg.beta_a, batch, generator, device)
        b = _gamma(cfg.beta_b, batch, generator, device)
        return (a / (a + b).clamp_min(1e-300)).float()  # both ~0 only for tiny shapes: t = 0 then
    raise UserError(f"flow.timestep_sampling must be uniform, logit_normal or beta, got {cfg.timestep_sampling!r}")


def timestep_grid(steps: int, shift: float = 1.0) -> list[float]:
    """The sampler's steps + 1 times from 0 to 1; shift s > 1 puts more of them near the noise end
    (noise level σ = 1 - t -> s·σ / (1 + (s - 1)·σ), as SD3)."""
    grid = []
    for i in range(steps + 1):
        sigma = 1.0 - i / steps
        grid.append(1.0 - shift * sigma / (1.0 + (shift - 1.0) * sigma))
    return grid


# -- training -------------------------------------------------------------------------------------


def _core(model: nn.Module) -> nn.Module:
    """The DiT inside torch.compile / DDP / DeepSpeed wrappers (for its config and task)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _state_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The flow's own tensors (x_t, targets, the ODE state): float32 for a bf16/fp16 model, whose rounding
    of x at every step compounds (2.5-9.4% relative error at the end of sampling vs 0.2% in float32)."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def contrastive_loss(pred: Tensor, true: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between L2-normalised embeddings [B, D]: sample b's positive is b."""
    logits = pred @ true.T / temperature
    labels = torch.arange(pred.shape[0], device=pred.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def training_loss(
    model: nn.Module,
    target: Tensor,
    cond: Tensor,
    cfg: FlowConfig,
    generator: torch.Generator | None,
    weight: Tensor | None = None,
    head: GlobalHead | None = None,
    denormalize=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The rectified-flow loss of one batch and its detached metrics (mse, velocity_cos[, contrastive]).

    Draws, in this order and only from `generator`: x0 ~ N(0, I), t, and the cond-drop mask (used in
    training mode only), so the trainer can replay a step exactly. x0 builds x_t AND the target u.
    `denormalize` maps normalised targets back to the data's units for the head (§3.1.1).
    """
    dit = _core(model)
    task, dtype, device = dit.task, _dtype(dit), target.device
    if target.dim() != 3 or tuple(target.shape[1:]) != (task.target_tokens, task.target_dim):
        raise UserError(f"training target of shape {list(target.shape)} does not fit task {task.name}: "
                        f"expected [B, {task.target_tokens}, {task.target_dim}]")
    o = ops.select(dit.config.fused_ops)
    batch = target.shape[0]
    # x_t and the velocity target come from the float32 target (float64 for a float64 model), not its
    # rounding to a bf16 model's dtype; the model casts its input, and its output is compared in float32
    acc = _state_dtype(dtype)
    x1 = target.to(acc)
    x0 = torch.randn(x1.shape, generator=generator, device=device, dtype=acc)
    t = sample_timesteps(batch, cfg, generator, device).to(acc)
    drop = torch.rand(batch, generator=generator, device=device) < dit.config.cond_drop

    x_t = o.flow_interpolate(x1, x0, t)
    v = model(x_t, t, cond, drop_cond=drop if model.training else None)
    loss, per_sample_mse, per_sample_cos = o.flow_matching_loss(v.to(acc), x1, x0, t, weight)
    metrics = {"mse": per_sample_mse.detach().mean(), "velocity_cos": per_sample_cos.detach().mean()}

    if cfg.cls_loss_weight > 0:
        if not task.target_cls:
            raise UserError("flow.cls_loss_weight > 0 needs target tokens with the CLS first (task.target_cls=true)")
        cls_mse = (v[:, 0].to(acc) - (x1[:, 0] - x0[:, 0])).pow(2).mean(-1)  # [B], weighted as the main term
        loss = loss + cfg.cls_loss_weight * (cls_mse if weight is None else weight.to(acc) * cls_mse).sum() / batch
        metrics["cls_mse"] = cls_mse.detach().mean()

    if cfg.contrastive_weight > 0:
        x1_hat = x_t + (1 - t).to(v.dtype)[:, None, None] * v  # the clean sample the velocity points at
        back = denormalize or (lambda x: x)
        pred = global_embedding(back(x1_hat), head, cfg.head, task.target_cls)
        with torch.no_grad():
            true = global_embedding(back(x1), head, cfg.head, task.target_cls)
        contrastive = contrastive_loss(pred, true, cfg.contrastive_temperature)
        loss = loss + cfg.contrastive_weight * contrastive
        metrics["contrastive"] = contrastive.detach()
    return loss, metrics


# -- sampling -------------------------------------------------------------------------------------


def _velocity(model: nn.Module, x: Tensor, t: float, cond: Tensor, guidance_scale: float) -> Tensor:
    """v(x, t | cond), classifier-free guided: v_null + g·(v_cond - v_null), both in one batch."""
    batch = x.shape[0]
    tt = torch.full((batch,), t, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if guidance_scale == 1.0:
        return model(x, tt, cond).to(x.dtype)
    drop = torch.arange(2 * batch, device=x.device) >= batch  # first half conditioned, second half null
    v = model(torch.cat((x, x)), torch.cat((tt, tt)), torch.cat((cond, cond)), drop_cond=drop).to(x.dtype)
    v_cond, v_null = v.chunk(2)  # combined in the state's precision
    return v_null + guidance_scale * (v_cond - v_null)


@torch.no_grad()
def sample(
    model: nn.Module,
    cond: Tensor,
    steps: int,
    sampler: str = "euler",
    timestep_shift: float = 1.0,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    target_shape: tuple[int, ...] | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Integrates dx/dt = v(x, t | cond) from noise at t = 0 to data at t = 1: x1 [B, Nt, Dt].

    Euler takes `steps` model calls, Heun (trapezoid predictor-corrector) 2·steps; with guidance
    scale g != 1 each call is one doubled batch (conditioned and null). `noise` is the start x0
    (instead of a draw from `generator`), so a caller can seed each sample on its own.
    """
    if sampler not in ("euler", "heun"):
        raise UserError(f"sampler must be euler or heun, got {sampler!r}")
    if steps < 1 or timestep_shift <= 0:
        raise UserError(f"sampling needs steps >= 1 and timestep_shift > 0, got {steps} and {timestep_shift}")
    dit = _core(model)
    task = dit.task
    shape = tuple(target_shape) if target_shape is not None else (cond.shape[0], task.target_tokens, task.target_dim)
    # the state (and Heun's predictor) stays float32 for a bf16 model: only the model's input is cast
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise UserError(f"sampling noise of shape {list(noise.shape)} does not fit: expected {list(shape)}")
        x = noise.to(cond.device, _state_dtype(_dtype(dit)))
    else:
        x = torch.randn(shape, generator=generator, device=cond.device, dtype=_state_dtype(_dtype(dit)))
    grid = timestep_grid(steps, timestep_shift)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        v0 = _velocity(model, x, t0, cond, guidance_scale)
        if sampler == "euler":
            x = x + (t1 - t0) * v0
        else:
            v1 = _velocity(model, x + (t1 - t0) * v0, t1, cond, guidance_scale)
            x = x + (t1 - t0) * 0.5 * (v0 + v1)
    return x
