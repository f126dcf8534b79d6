"""The compiled ops' Python face: fake (meta) kernels and autograd, registered with torch.library.

Every function here has the signature and outputs of its reference in `reference.py`. Backward runs
through the `*_bwd` ops, so gradients use the same fused kernels. The statistics outputs (mean,
rstd) and the velocity cosine are not differentiable: their incoming gradients are ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _extension

_extension.load()

_ops = torch.ops.blip3o_fast


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- rope3d ---------------------------------------------------------------------------------------


@torch.library.register_fake("blip3o_fast::rope3d")
def _rope3d_fake(q, k, cos_q, sin_q, cos_k, sin_k):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "q and k must be 4-D [B, S, H, D]")
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.register_fake("blip3o_fast::rope3d_bwd")
def _rope3d_bwd_fake(grad_q, grad_k, cos_q, sin_q, cos_k, sin_k):
    return grad_q.new_empty(grad_q.shape), grad_k.new_empty(grad_k.shape)


def _rope3d_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[2:])


def _rope3d_backward(ctx, grad_q, grad_k):
    grad_q, grad_k = _ops.rope3d_bwd(grad_q, grad_k, *ctx.saved_tensors)
    return grad_q, grad_k, None, None, None, None


torch.library.register_autograd("blip3o_fast::rope3d", _rope3d_backward, setup_context=_rope3d_setup)


def rope3d(q: Tensor, k: Tensor, cos_q: Tensor, sin_q: Tensor, cos_k: Tensor, sin_k: Tensor) -> tuple[Tensor, Tensor]:
    return _ops.rope3d(q, k, cos_q, sin_q, cos_k, sin_k)


@torch.library.register_fake("blip3o_fast::qk_norm_rope3d")
def _qk_norm_rope3d_fake(q, k, weight_q, weight_k, eps, cos_q, sin_q, cos_k, sin_k):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "q and k must be 4-D [B, S, H, D]")
    acc = _acc(q.dtype)
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(q.shape[:3], dtype=acc),
            k.new_empty(k.shape[:3], dtype=acc))


@torch.library.register_fake("blip3o_fast::qk_norm_rope3d_bwd")
def _qk_norm_rope3d_bwd_fake(grad_q, grad_k, q, k, weight_q, weight_k, rstd_q, rstd_k, cos_q, sin_q, cos_k, sin_k):
    return q.new_empty(q.shape), k.new_empty(k.shape), weight_q.new_empty(weight_q.shape), \
        weight_k.new_empty(weight_k.shape)


def _qk_norm_rope3d_setup(ctx, inputs, output):
    q, k, weight_q, weight_k, _, cos_q, sin_q, cos_k, sin_k = inputs
    ctx.save_for_backward(q, k, weight_q, weight_k, output[2], output[3], cos_q, sin_q, cos_k, sin_k)


def _qk_norm_rope3d_backward(ctx, grad_q, grad_k, _grad_rstd_q, _grad_rstd_k):
    grads = _ops.qk_norm_rope3d_bwd(grad_q, grad_k, *ctx.saved_tensors)
    return (*grads, None, None, None, None, None)


torch.library.register_autograd(
    "blip3o_fast::qk_norm_rope3d", _qk_norm_rope3d_backward, setup_context=_qk_norm_rope3d_setup
)


def qk_norm_rope3d(
    q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, eps: float, cos_q: Tensor, sin_q: Tensor,
    cos_k: Tensor, sin_k: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ops.qk_norm_rope3d(q, k, weight_q, weight_k, eps, cos_q, sin_q, cos_k, sin_k)


# -- adaln ----------------------------------------------------------------------------------------


def _stats_fake(x: Tensor, norm: str) -> tuple[Tensor, Tensor]:
    acc = _acc(x.dtype)
    rstd = x.new_empty(x.shape[:-1], dtype=acc)
    mean = x.new_empty(x.shape[:-1], dtype=acc) if norm == "layer" else x.new_empty(0, dtype=acc)
    return mean, rstd


@torch.library.register_fake("blip3o_fast::adaln_modulate")
def _adaln_modulate_fake(x, shift, scale, eps, norm):
    torch._check(x.dim() == 3, lambda: "x must be 3-D [B, S, C]")
    return (x.new_empty(x.shape), *_stats_fake(x, norm))


@torch.library.register_fake("blip3o_fast::adaln_modulate_bwd")
def _adaln_modulate_bwd_fake(grad_y, x, scale, mean, rstd, norm):
    return x.new_empty(x.shape), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


def _adaln_modulate_setup(ctx, inputs, output):
    x, _, scale, _, norm = inputs
    _, mean, rstd = output
    ctx.norm = norm
    ctx.save_for_backward(x, scale, mean, rstd)


def _adaln_modulate_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    grad_x, grad_shift, grad_scale = _ops.adaln_modulate_bwd(grad_y, x, scale, mean, rstd, ctx.norm)
    return grad_x, grad_shift, grad_scale, None, None


torch.library.register_autograd(
    "blip3o_fast::adaln_modulate", _adaln_modulate_backward, setup_context=_adaln_modulate_setup
)


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float, norm: str) -> tuple[Tensor, Tensor, Tensor]:
    return _ops.adaln_modulate(x, shift, scale, eps, norm)


@torch.library.register_fake("blip3o_fast::gated_residual_adaln")
def _gated_residual_adaln_fake(x, y, gate, shift, scale, eps, norm):
    torch._check(x.dim() == 3, lambda: "x must be 3-D [B, S, C]")
    return (x.new_empty(x.shape), x.new_empty(x.shape), *_stats_fake(x, norm))


@torch.library.register_fake("blip3o_fast::gated_residual_adaln_bwd")
def _gated_residual_adaln_bwd_fake(grad_x_new, grad_h, x_new, y, gate, scale, mean, rstd, norm):
    params = [gate.new_empty(gate.shape) for _ in range(3)]
    return (x_new.new_empty(x_new.shape), y.new_empty(y.shape), *params)


def _gated_residual_adaln_setup(ctx, inputs, output):
    _, y, gate, _, scale, _, norm = inputs
    x_new, _, mean, rstd = output
    ctx.norm = norm
    ctx.save_for_backward(x_new, y, gate, scale, mean, rstd)


def _gated_residual_adaln_backward(ctx, grad_x_new, grad_h, _grad_mean, _grad_rstd):
    grads = _ops.gated_residual_adaln_bwd(grad_x_new, grad_h, *ctx.saved_tensors, ctx.norm)
    return (*grads, None, None)


torch.library.register_autograd(
    "blip3o_fast::gated_residual_adaln", _gated_residual_adaln_backward, setup_context=_gated_residual_adaln_setup
)


def gated_residual_adaln(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float, norm: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ops.gated_residual_adaln(x, y, gate, shift, scale, eps, norm)


# -- swiglu ---------------------------------------------------------------------------------------


@torch.library.register_fake("blip3o_fast::swiglu")
def _swiglu_fake(ab):
    torch._check(ab.dim() >= 1 and ab.shape[-1] % 2 == 0, lambda: "ab's last dim must be even ([a | b])")
    return ab.new_empty((*ab.shape[:-1], ab.shape[-1] // 2))


@torch.library.register_fake("blip3o_fast::swiglu_bwd")
def _swiglu_bwd_fake(grad, ab):
    return ab.new_empty(ab.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, grad):
    (ab,) = ctx.saved_tensors
    return _ops.swiglu_bwd(grad, ab)


torch.library.register_autograd("blip3o_fast::swiglu", _swiglu_backward, setup_context=_swiglu_setup)


def swiglu(ab: Tensor) -> Tensor:
    return _ops.swiglu(ab)


# -- flow matching --------------------------------------------------------------------------------


@torch.library.register_fake("blip3o_fast::flow_interpolate")
def _flow_interpolate_fake(x1, x0, t):
    torch._check(x1.dim() == 3, lambda: "x1 must be 3-D [B, S, C]")
    return x1.new_empty(x1.shape)


@torch.library.register_fake("blip3o_fast::flow_interpolate_bwd")
def _flow_interpolate_bwd_fake(grad_x_t, t, need_x1=True, need_x0=True):
    shape = lambda need: grad_x_t.shape if need else (0,)
    return grad_x_t.new_empty(shape(need_x1)), grad_x_t.new_empty(shape(need_x0))


def _flow_interpolate_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _flow_interpolate_backward(ctx, grad_x_t):
    (t,) = ctx.saved_tensors
    need_x1, need_x0 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x1 or need_x0):
        return None, None, None
    grad_x1, grad_x0 = _ops.flow_interpolate_bwd(grad_x_t, t, need_x1, need_x0)
    return grad_x1 if need_x1 else None, grad_x0 if need_x0 else None, None


torch.library.register_autograd(
    "blip3o_fast::flow_interpolate", _flow_interpolate_backward, setup_context=_flow_interpolate_setup
)


def flow_interpolate(x1: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    return _ops.flow_interpolate(x1, x0, t)


@torch.library.register_fake("blip3o_fast::flow_matching_loss")
def _flow_matching_loss_fake(v, x1, x0, t, weight):
    torch._check(v.dim() == 3, lambda: "v must be 3-D [B, S, C]")
    acc = _acc(v.dtype)
    return v.new_empty((), dtype=acc), v.new_empty(v.shape[:1], dtype=acc), v.new_empty(v.shape[:1], dtype=acc)


@torch.library.register_fake("blip3o_fast::flow_matching_loss_bwd")
def _flow_matching_loss_bwd_fake(grad_per_sample, v, x1, x0):
    return v.new_empty(v.shape)


def _flow_matching_loss_setup(ctx, inputs, output):
    v, x1, x0, _, weight = inputs
    ctx.has_weight = weight is not None
    ctx.save_for_backward(v, x1, x0, output[1], *([weight] if weight is not None else []))


def _flow_matching_loss_backward(ctx, grad_loss, grad_per_sample_mse, _grad_cos):
    v, x1, x0, per_sample_mse, *maybe_weight = ctx.saved_tensors
    batch = v.shape[0]
    # dL/dmse_b: through the loss (w_b / B), and through per_sample_mse itself should a caller use it
    coef = grad_loss / batch
    grad_weight = coef * per_sample_mse if ctx.has_weight and ctx.needs_input_grad[4] else None
    coef = coef * maybe_weight[0].to(coef.dtype) if ctx.has_weight else coef.expand(batch)
    grad_v = _ops.flow_matching_loss_bwd(coef + grad_per_sample_mse, v, x1, x0)
    # u = x1 - x0 enters the loss as -u: the targets' gradients mirror v's
    grad_x1 = -grad_v if ctx.needs_input_grad[1] else None
    grad_x0 = grad_v if ctx.needs_input_grad[2] else None
    return grad_v if ctx.needs_input_grad[0] else None, grad_x1, grad_x0, None, grad_weight


torch.library.register_autograd(
    "blip3o_fast::flow_matching_loss", _flow_matching_loss_backward, setup_context=_flow_matching_loss_setup
)


def flow_matching_loss(
    v: Tensor, x1: Tensor, x0: Tensor, t: Tensor, weight: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    return _ops.flow_matching_loss(v, x1, x0, t, weight)
