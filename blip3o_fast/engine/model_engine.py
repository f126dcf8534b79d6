"""The DiT inside a DeepSpeed engine (ZeRO 0-3; fp32, bf16 or loss-scaled fp16) and the non-finite step skip.

    model_engine = ModelEngine(model, cfg, device, precision)   # .engine: the DeepSpeed engine (forward, checkpoints)
    model_engine.set_lr(lr)
    model_engine.backward(loss); model_engine.micro_step()       # between micro-batches
    grad_norm, skipped = model_engine.step()                     # at the accumulation boundary

A step with a non-finite gradient changes no weight and no optimizer moment on any rank. ZeRO >= 1,
bf16 and fp16 wrap the optimizer in DeepSpeed's own, which detects the overflow, skips and reports an
infinite norm (under fp16 a loss-scale overflow is also how the scale is found); stage 0 in fp32 passes
our SkippableAdamW through unchecked, so we check the norm ourselves.
Which of the two applies is decided once, when the engine is built.
"""

from __future__ import annotations

import math

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist

from ..config import RunConfig
from ..config.schema import ConfigError
from .ds_config import deepspeed_config
from .optim import SkippableAdamW, make_adamw


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on a GPU that supports it, fp16 (loss-scaled) on one that does not, fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed's loss-scaled fp16 optimizer); use fp32 or "
                          "auto on CPU")
    return precision


SHM_ALLREDUCE_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU shared-memory allreduce (op_builder/cpu/comm.py)
COMPUTE_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelEngine:
    def __init__(self, model: torch.nn.Module, cfg: RunConfig, device: torch.device, precision: str,
                 load_universal: bool = False):
        optimizer = make_adamw(model, cfg.train, device)
        world = dist.get_world_size() if dist.is_initialized() else 1
        config = deepspeed_config(cfg, precision, world)
        if load_universal:  # an elastic resume of a ZeRO 1-3 checkpoint (runtime/checkpoint.py)
            config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
        if world == 1:  # no peer to share memory with: skip the JIT build (~30 s cold) of DeepSpeed's shm allreduce
            deepspeed.ops.__compatible_ops__[SHM_ALLREDUCE_OP] = False
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
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
