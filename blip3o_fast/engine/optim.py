"""The optimizer and its schedule: torch AdamW (fused kernel where there is one) and warmup + cosine."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, cfg) -> float:
    """Linear warmup to train.lr over warmup_steps, then cosine decay to train.min_lr at train.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (nanoGPT): not on biases, norm gains or 1-D parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be declined: DeepSpeed still runs its step bookkeeping (counters,
    zero_grad) while weights and moments stay untouched. How a stage-0 fp32 step with non-finite
    gradients is skipped; ZeRO and bf16 optimizers skip such steps themselves."""

    skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def make_adamw(model: torch.nn.Module, cfg, device: torch.device) -> SkippableAdamW:
    """torch's AdamW, with its fused kernel (one pass over each parameter's state) where this torch has one
    for the device (CUDA; CPU since 2.4), else the multi-tensor one."""
    groups = optimizer_groups(model, cfg.weight_decay)
    model.to(device)
    try:
        return SkippableAdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    except (RuntimeError, TypeError):
        return SkippableAdamW(groups, lr=cfg.lr, betas=cfg.betas)
