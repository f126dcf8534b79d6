"""The DiT inside a DeepSpeed engine (ZeRO 0-3, fp32 or bf16) and the non-finite step skip.

    model_engine = ModelEngine(model, cfg, device, precision)   # .engine: the DeepSpeed engine (forward, checkpoints)
    model_engine.set_lr(lr)
    model_engine.backward(loss); model_engine.micro_step()       # between micro-batches
    grad_norm, skipped = model_engine.step()                     # at the accumulation boundary

A step with a non-finite gradient changes no weight and no optimizer moment on any rank. ZeRO >= 1 and
bf16 wrap the optimizer in DeepSpeed's own, which detects the overflow, skips and reports an infinite
norm; stage 0 in fp32 passes our SkippableAdamW through unchecked, so we check the norm ourselves.
Which of the two applies is decided once, when the engine is built.
"""

from __future__ import annotations

import math

import deepspeed
import torch

from ..config import RunConfig
from .optim import SkippableAdamW, make_adamw


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def deepspeed_config(cfg: RunConfig, precision: str) -> dict:
    zero = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage == 3:
        # gather parameters per use and keep no persistent full copies: ZeRO-3's point
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=int(1e9))
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


class ModelEngine:
    def __init__(self, model: torch.nn.Module, cfg: RunConfig, device: torch.device, precision: str):
        optimizer = make_adamw(model, cfg.train, device)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(cfg, precision))
        # our optimizer came back unwrapped: DeepSpeed will not check its gradients, we must
        self._local_check = isinstance(self.engine.optimizer, SkippableAdamW)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def micro_step(self) -> None:
        """DeepSpeed's bookkeeping between micro-batches; no update before the accumulation boundary."""
        self.engine.step()

    def step(self) -> tuple[float | None, bool]:
        """The optimizer step at the accumulation boundary: (gradient norm before clipping, skipped)."""
        if self._local_check:
            grad_norm = self._grad_norm()
            skip = not math.isfinite(grad_norm)
            self.engine.optimizer.skip_next = skip
            self.engine.step()
            return grad_norm, skip
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else None
        return grad_norm, grad_norm is not None and not math.isfinite(grad_norm)

    def _grad_norm(self) -> float:
        """The (already all-reduced, stage 0) gradient norm, before DeepSpeed clips it."""
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0
