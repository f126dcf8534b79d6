"""The fused operators (docs/architecture.md §3.2) and their pure-PyTorch references.

`select(fused)` gives the op set a model runs on: `fused` (the compiled extension, loaded on first
use) or `reference`. Both expose the same functions with the same outputs:

    rope3d(q, k, cos_q, sin_q, cos_k, sin_k) -> (q_rot, k_rot)
    qk_norm_rope3d(q, k, weight_q, weight_k, eps, cos_q, sin_q, cos_k, sin_k) -> (q_out, k_out, rstd_q, rstd_k)
    adaln_modulate(x, shift, scale, eps, norm) -> (y, mean, rstd)
    gated_residual_adaln(x, y, gate, shift, scale, eps, norm) -> (x_new, h, mean, rstd)
    swiglu(ab) -> silu(a)·b of ab = [a | b]
    flow_interpolate(x1, x0, t) -> x_t
    flow_matching_loss(v, x1, x0, t, weight=None) -> (loss, per_sample_mse, per_sample_cos)
"""

from __future__ import annotations

from types import ModuleType

from . import reference
from ._extension import ExtensionError, build_info, check_device, has_kernel
from .rope_tables import default_sections, rope3d_tables

__all__ = [
    "ExtensionError",
    "build_info",
    "check_device",
    "default_sections",
    "has_kernel",
    "reference",
    "rope3d_tables",
    "select",
]


def select(fused: bool) -> ModuleType:
    """The compiled ops (`fused=True`, loading the extension or raising a one-line ExtensionError)
    or their references."""
    if fused:
        from . import fused as fused_ops

        return fused_ops
    return reference
