"""Exponential moving average of the model weights, kept in float32, under any ZeRO stage.

Stages 0-2 keep full parameters on every rank, so the average is of full tensors. ZeRO-3 keeps
only a partition of each parameter (`param.ds_tensor`) on each rank, so the average is of that
partition; `full_state_dict` gathers partitions into full tensors and `load_full_state_dict`
slices them back, so checkpoints and evaluation always see ordinary full weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.params = [(name, p) for name, p in module.named_parameters()]
        self.shadow = {name: self._local(p).detach().float().clone() for name, p in self.params}

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if _is_partitioned(p) else p.data

    def decay_at(self, step: int) -> float:
        """Warmed-up decay: averages over fewer steps early on, so early weights fade quickly."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = self.decay_at(step)
        for name, p in self.params:
            self.shadow[name].lerp_(self._local(p).float(), 1 - d)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full float32 tensors (CPU). A collective under ZeRO-3: every rank must call it."""
        out = {}
        for name, p in self.params:
            shard = self.shadow[name]
            if _is_partitioned(p) and dist.is_initialized() and dist.get_world_size() > 1:
                parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, shard)
                flat = torch.cat(parts)[: p.ds_numel]
                out[name] = flat.view(p.ds_shape).cpu()
            elif _is_partitioned(p):
                out[name] = shard[: p.ds_numel].view(p.ds_shape).cpu()
            else:
                out[name] = shard.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name, _ in self.params if name not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[0]}")
        for name, p in self.params:
            full = state[name].float()
            if _is_partitioned(p):
                size = self.shadow[name].numel()
                rank = dist.get_rank() if dist.is_initialized() else 0
                flat = torch.zeros(size * (dist.get_world_size() if dist.is_initialized() else 1))
                flat[: full.numel()] = full.reshape(-1)
                self.shadow[name].copy_(flat[rank * size:(rank + 1) * size])
            else:
                self.shadow[name].copy_(full.view_as(self.shadow[name]))
