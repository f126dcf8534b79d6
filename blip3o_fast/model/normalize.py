"""Normalisation of the flow's data space (docs/architecture.md §3.1.1): `flow.target_norm`, `flow.cond_norm`.

The noise is N(0, I). Real encoder features are far from unit scale per channel (a few CLIP channels carry
values tens of times larger than the rest), which makes the straight path from noise to data badly
conditioned (latent diffusion's scale factor, LightningDiT's latent normalisation). So the flow runs on
    x_norm = (x - mean) / std
with per-channel (`channel`) or one scalar (`global`) mean and std of the train split (data/stats.py);
`none` is the identity (and the statistics are not read). Training normalises targets and conditions;
sampling normalises the condition and de-normalises what it generates, so every caller sees features in the
dataset's own units.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..config.schema import NORM_MODES as MODES
from ..errors import UserError

STD_FLOOR = 1e-3  # a channel whose std is below this fraction of the stream's RMS std is not blown up


def _affine(mean: Tensor, std: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """(shift, scale) [D] float64 for a mode, from per-channel mean and std [D]."""
    mean, std = mean.to(torch.float64), std.to(torch.float64)
    if mode == "channel":
        rms = std.square().mean().sqrt()
        return mean, std.clamp_min(max(float(rms) * STD_FLOOR, 1e-12))
    # global: the moments of all channels pooled (each channel the same count of values)
    shift = mean.mean()
    var = (std.square() + (mean - shift).square()).mean()
    return shift.expand_as(mean), var.sqrt().clamp_min(1e-12).expand_as(std)


def needs_stats(flow_cfg) -> bool:
    """Whether the flow config normalises anything (only then are the dataset's statistics read)."""
    return flow_cfg.target_norm != "none" or flow_cfg.cond_norm != "none"


class StreamNorm(nn.Module):
    """x -> (x - shift) / scale and back, in the input's dtype (the constants in float32 or float64)."""

    def __init__(self, mean: Tensor | None, std: Tensor | None, mode: str, name: str):
        super().__init__()
        if mode not in MODES:
            raise UserError(f"flow.{name}_norm must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        if mode == "none":
            shift, scale = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        else:
            if mean is None or std is None:
                raise UserError(f"flow.{name}_norm={mode} needs the dataset's statistics (stats.safetensors): "
                                f"run `blip3o-fast data stats DATASET` or set flow.{name}_norm=none")
            shift, scale = _affine(mean, std, mode)
        self.register_buffer("shift", shift.clone(), persistent=False)
        self.register_buffer("scale", scale.clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "none":
            return x
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return ((x.to(dtype) - self.shift.to(dtype)) / self.scale.to(dtype)).to(x.dtype)

    def inverse(self, x: Tensor) -> Tensor:
        if self.mode == "none":
            return x
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.to(dtype) * self.scale.to(dtype) + self.shift.to(dtype)).to(x.dtype)


class FlowNorm(nn.Module):
    """The target's and the condition's StreamNorm, built from a flow config and the statistics tensors
    (`{cond,target}.{mean,std}`, as data/stats.py stores them; None when there are none)."""

    def __init__(self, flow_cfg, stats: dict[str, Tensor] | None):
        super().__init__()
        stats = stats or {}
        self.target = StreamNorm(stats.get("target.mean"), stats.get("target.std"), flow_cfg.target_norm, "target")
        self.cond = StreamNorm(stats.get("cond.mean"), stats.get("cond.std"), flow_cfg.cond_norm, "cond")

    @property
    def active(self) -> bool:
        return self.target.mode != "none" or self.cond.mode != "none"
