"""Pure-PyTorch reference of every fused op: the spec in code (docs/architecture.md §3.2-§3.6).

Each function has exactly the signature and outputs of its compiled op, computes in float32
(float64 for float64 inputs) and rounds outputs to the input dtype where the op does. Tests compare
the compiled kernels against these; `model.fused_ops: false` runs the model on them.
"""

from __future__ import annotations

import torch
from torch import Tensor

COS_EPS = 1e-8  # floor of |v|·|u| in the velocity cosine


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise: the accumulation and statistics dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- rope3d ---------------------------------------------------------------------------------------


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates interleaved pairs (x[2j], x[2j+1]) of x [B, S, H, D] by tables [S, D/2]."""
    xf = x.to(cos.dtype)
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


def rope3d(q: Tensor, k: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor, sin_k: Tensor) -> tuple[Tensor, Tensor]:
    return _rotate(q, cos_q, sin_q), _rotate(k, cos_k, sin_k)


def qk_norm_rope3d(
    q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, eps: float, cos_q: Tensor, sin_q: Tensor,
    cos_k: Tensor, sin_k: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RMSNorm (weight [D], over each head vector) then RoPE, without rounding in between:
    (rope(q·rstd_q·w_q), rope(k·rstd_k·w_k), rstd_q, rstd_k), rstd = 1/sqrt(mean(x²) + eps) [B, S, H]."""
    def one(x, weight, cos, sin):
        xf = x.to(acc_dtype(x.dtype))
        rstd = torch.rsqrt(xf.pow(2).mean(dim=-1) + eps)
        return _rotate(xf * rstd[..., None] * weight.to(xf.dtype), cos, sin).to(x.dtype), rstd

    (q_out, rstd_q), (k_out, rstd_k) = one(q, weight_q, cos_q, sin_q), one(k, weight_k, cos_k, sin_k)
    return q_out, k_out, rstd_q, rstd_k


# -- adaln ----------------------------------------------------------------------------------------


def _normalize(x: Tensor, eps: float, norm: str) -> tuple[Tensor, Tensor, Tensor]:
    """N(x) over the last dim in the accumulation dtype, with its statistics mean and rstd [B, S]."""
    xf = x.to(acc_dtype(x.dtype))
    if norm == "layer":
        var, mean = torch.var_mean(xf, dim=-1, unbiased=False)
        rstd = torch.rsqrt(var + eps)
        return (xf - mean[..., None]) * rstd[..., None], mean, rstd
    if norm == "rms":
        rstd = torch.rsqrt(xf.pow(2).mean(dim=-1) + eps)
        return xf * rstd[..., None], xf.new_empty(0), rstd
    raise ValueError(f'norm must be "layer" or "rms", got "{norm}"')


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float, norm: str) -> tuple[Tensor, Tensor, Tensor]:
    n, mean, rstd = _normalize(x, eps, norm)
    acc = n.dtype
    y = n * (1 + scale.to(acc)[:, None, :]) + shift.to(acc)[:, None, :]
    return y.to(x.dtype), mean, rstd


def gated_residual_adaln(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float, norm: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    # the statistics are those of x_new as stored (rounded to x's dtype), as the backward sees it
    x_new = (x.to(acc) + gate.to(acc)[:, None, :] * y.to(acc)).to(x.dtype)
    h, mean, rstd = adaln_modulate(x_new, shift, scale, eps, norm)
    return x_new, h, mean, rstd


# -- swiglu ---------------------------------------------------------------------------------------


def swiglu(ab: Tensor) -> Tensor:
    """silu(a)·b of ab = [a | b] split in halves over the last dim: [..., 2F] -> [..., F]."""
    a, b = ab.to(acc_dtype(ab.dtype)).chunk(2, dim=-1)
    return (torch.nn.functional.silu(a) * b).to(ab.dtype)


# -- flow matching --------------------------------------------------------------------------------


def flow_interpolate(x1: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t)·x0 + t·x1: t = 0 is pure noise, t = 1 is data."""
    acc = acc_dtype(x1.dtype)
    tt = t.to(acc)[:, None, None]
    return ((1 - tt) * x0.to(acc) + tt * x1.to(acc)).to(x1.dtype)


def flow_matching_loss(
    v: Tensor, x1: Tensor, x0: Tensor, t: Tensor, weight: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Velocity regression onto u = x1 - x0, with x0 the same noise that built the model input x_t.

    loss = Σ_b weight[b]·mean_{s,c}(v - u)² / B (no hidden constant); per_sample_cos is the mean
    over tokens of cos(v[b,s], u[b,s]), for monitoring only (no gradient). `t` is part of the flow
    state the loss is asked about; the loss depends on time only through `weight`.
    """
    acc = acc_dtype(v.dtype)
    u = x1.to(acc) - x0.to(acc)
    vf = v.to(acc)
    per_sample_mse = (vf - u).pow(2).mean(dim=(1, 2))
    w = torch.ones_like(per_sample_mse) if weight is None else weight.to(acc)
    loss = (w * per_sample_mse).sum() / v.shape[0]
    with torch.no_grad():
        dot = (vf * u).sum(-1)
        denom = (vf.norm(dim=-1) * u.norm(dim=-1)).clamp_min(COS_EPS)
        per_sample_cos = (dot / denom).mean(-1)
    return loss, per_sample_mse, per_sample_cos
