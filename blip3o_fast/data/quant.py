"""8-bit storage of a token stream (docs/architecture.md §3.9.6): int8 values with a float32 scale.

Symmetric absmax quantisation: `scale = max|x| / 127` over each channel of the sample (`scale: channel`,
a [1, D] scale; the default: CLIP's outlier channels leave the rest a few levels under a per-token scale)
or over each token (`scale: token`, [N, 1]); `q = round(x / scale)` in [-127, 127].
-128 is never written, so a -128 read back is damage, like a scale that is not finite and positive.
`dequantize` is the one way back, on the CPU in the reader or on the GPU after the host-to-device copy
(half the bytes cross PCIe).
"""

from __future__ import annotations

import numpy as np
import torch

from .tario import NpyError

QMAX = 127


def scale_shape(tokens: int, dim: int, per: str) -> tuple[int, int]:
    """The scale member's shape: [N, 1] for one scale per token, [1, D] for one per channel."""
    return (tokens, 1) if per == "token" else (1, dim)


def quantize(x: np.ndarray, per: str = "channel") -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale) of a finite [N, D] array; an all-zero token/channel gets scale 1."""
    x = np.asarray(x, dtype=np.float32)
    absmax = np.abs(x).max(axis=1 if per == "token" else 0, keepdims=True)
    scale = np.where(absmax > 0, absmax / QMAX, 1.0).astype(np.float32)
    q = np.rint(x / scale)
    np.clip(q, -QMAX, QMAX, out=q)  # rounding of absmax/scale can land on 127.00001: never on -128
    return q.astype(np.int8), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """values · scale in float32, then cast to `dtype`; works on any device and on batches ([B, N, D]). With
    `out` (of `dtype`) the product is written there in one pass, without the float32 temporary: the same values,
    4x faster on the CPU (the reader's batch rows)."""
    if out is not None:
        return torch.mul(values, scale.to(torch.float32), out=out)
    return (values.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def dequantize_array(values: np.ndarray, scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`dequantize` on numpy arrays (the writers' check of what a reader will get back)."""
    torch_dtype = torch.float16 if dtype == np.float16 else torch.float32
    return dequantize(torch.from_numpy(values), torch.from_numpy(scale), torch_dtype).numpy()


def check_quantized(values: np.ndarray, scale: np.ndarray, name: str, dtype: np.dtype) -> None:
    """NpyError (a counted skip) for a scale that is not finite, > 0 and small enough that 127 · scale fits
    `dtype` (every dequantised value is then finite, on the CPU or the device), or a value of -128 (never
    written)."""
    info = np.finfo(dtype)
    limit = float(info.max) * (1 + float(info.eps) / 4) / QMAX  # below max + half an ulp: rounds to a finite max
    if not (np.isfinite(scale).all() and (scale > 0).all() and float(scale.max()) <= limit):
        raise NpyError("bad scale", f"{name} scale not finite, > 0 and <= {limit:.6g}")
    if values.size and int(values.min()) < -QMAX:
        raise NpyError("out of range", f"{name} int8 value -128 (never written)")


def to_device(batch: dict, name: str, device, dtype: torch.dtype | None = None,
              non_blocking: bool = False) -> torch.Tensor:
    """A batch stream on `device` in `dtype`: int8 values passed through the reader (`<name>_scale` beside them)
    are copied as int8 and dequantised there (to float16, what the writers store, when `dtype` is None), float
    values are copied and cast (kept in their dtype when None)."""
    values = batch[name].to(device, non_blocking=non_blocking)
    scale = batch.get(f"{name}_scale")
    if scale is None:
        return values if dtype is None else values.to(dtype)
    return dequantize(values, scale.to(device, non_blocking=non_blocking), dtype or torch.float16)
