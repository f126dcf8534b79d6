"""Attention backends of the DiT (docs/architecture.md §3.7.4): q, k, v in the flash layout [B, S, H, D].

`auto` uses flash-attn when it is installed and the input is on a GPU it supports (sm80+, fp16 or
bf16), else PyTorch SDPA (which on GPU picks its own flash / cuDNN / memory-efficient kernel);
`sdpa` always SDPA; `flash_attn` insists on flash-attn; `math` is the plain softmax(QK^T/sqrt(d))V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ATTENTION_BACKENDS
from ..errors import UserError

try:  # optional: `pip install flash-attn` (the [flash] extra)
    from flash_attn import flash_attn_func
except ImportError:  # also on CPU-only installs, where flash-attn cannot build
    flash_attn_func = None



def flash_available() -> bool:
    """Whether the flash-attn package could be imported."""
    return flash_attn_func is not None


def flash_supported(q: Tensor) -> bool:
    """Whether flash-attn can run on q: installed, CUDA sm80+, fp16/bf16, head dim a multiple of 8 up to 256."""
    return (
        flash_attn_func is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and torch.cuda.get_device_capability(q.device)[0] >= 8
    )


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q·kᵀ/√d)·v spelled out, softmax in at least float32: the reference of the other backends."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    probs = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=-1).to(v.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        # CPU SDPA's bf16 kernels are 1.2-5x slower than its float32 one, forward and backward (head dims
        # 32-64, bench/bench_step.py): the casts cost less than they save, and the softmax gains precision
        q, k, v = q.float(), k.float(), v.float()
    # SDPA wants [B, H, S, D]: transposed views, no copies
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).to(dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """Multi-head attention without mask or dropout: q [B, Sq, H, D], k and v [B, Sk, H, D] -> [B, Sq, H, D]."""
    if backend == "math":
        return math_attention(q, k, v)
    if backend == "flash_attn" or (backend == "auto" and flash_supported(q)):
        if not flash_supported(q):
            raise UserError(
                f"model.attention=flash_attn cannot run on {q.device.type} {str(q.dtype).removeprefix('torch.')} "
                f"(installed: {flash_available()}): it needs flash-attn, a CUDA sm80+ GPU and bf16/fp16; "
                "use model.attention=auto"
            )
        return flash_attn_func(q, k, v)
    if backend in ("auto", "sdpa"):
        return sdpa_attention(q, k, v)
    raise UserError(f"unknown attention backend {backend!r}; use one of {', '.join(ATTENTION_BACKENDS)}")
