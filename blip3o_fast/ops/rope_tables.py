"""cos/sin tables of the 3-axis rotary embedding (docs/architecture.md §3.3), built once per grid and cached.

The head dim D is split into sections (d_t, d_h, d_w), each even, summing to D. A token at position
(p_t, p_h, p_w) gets angles p_a·θ^(-2i/d_a), i < d_a/2, per axis a in the order t, h, w,
concatenated into D/2 angles. Patch tokens of a gh×gw grid are row-major: token n sits at
(p_t, n // gw, n % gw). A CLS token (first in the sequence) sits at (cls_t, 0, 0).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

DEFAULT_THETA = 10000.0
DEFAULT_CLS_T = -1  # the CLS token's own t position: apart from target (0) and condition (1) streams


def default_sections(head_dim: int) -> tuple[int, int, int]:
    """(d_t, d_h, d_w) with d_t ≈ D/4 and h, w sharing the rest; (16, 24, 24) for D = 64."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope head dim must be a positive even number, got {head_dim}")
    d_t = 2 * (head_dim // 8)
    rest = head_dim - d_t
    d_h = 2 * (rest // 4)
    return d_t, d_h, rest - d_h


def check_sections(sections: tuple[int, int, int], head_dim: int) -> None:
    if len(sections) != 3 or any(d < 0 or d % 2 for d in sections) or sum(sections) != head_dim:
        raise ValueError(
            f"rope sections {tuple(sections)} must be three even numbers summing to the head dim {head_dim}"
            f" (for example {default_sections(head_dim)})"
        )


def positions(grid: tuple[int, int], p_t: int = 0, cls: bool = False, cls_t: int = DEFAULT_CLS_T) -> Tensor:
    """Integer (t, h, w) positions [S, 3] of a row-major gh×gw grid, optionally led by a CLS token."""
    gh, gw = grid
    n = torch.arange(gh * gw)
    pos = torch.stack((torch.full_like(n, p_t), n // gw, n % gw), dim=1)
    if cls:
        pos = torch.cat((torch.tensor([[cls_t, 0, 0]]), pos), dim=0)
    return pos


def angles(pos: Tensor, sections: tuple[int, int, int], theta: float = DEFAULT_THETA) -> Tensor:
    """Rotation angles [S, D/2] (float64) of integer positions [S, 3]."""
    parts = []
    for axis, d in enumerate(sections):
        if d == 0:
            continue
        inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        parts.append(pos[:, axis : axis + 1].to(torch.float64) * inv_freq[None, :])
    return torch.cat(parts, dim=1)


@functools.lru_cache(maxsize=64)
def _cached_tables(grid, head_dim, sections, theta, p_t, cls, cls_t, device, dtype):
    ang = angles(positions(grid, p_t, cls, cls_t), sections, theta)
    return ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)


def rope3d_tables(
    grid: tuple[int, int],
    head_dim: int,
    sections: tuple[int, int, int] | None = None,
    theta: float = DEFAULT_THETA,
    p_t: int = 0,
    cls: bool = False,
    cls_t: int = DEFAULT_CLS_T,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(cos, sin), each [S, D/2] with S = gh·gw (+1 with cls), cached per (grid, ..., device, dtype).

    The cached tensors are shared: treat them as read-only.
    """
    sections = tuple(sections) if sections is not None else default_sections(head_dim)
    check_sections(sections, head_dim)
    return _cached_tables(
        tuple(grid), head_dim, sections, float(theta), int(p_t), bool(cls), int(cls_t), torch.device(device), dtype
    )
