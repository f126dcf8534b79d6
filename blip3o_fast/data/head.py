"""`head.safetensors`: the target encoder's global head (CLIP's `post_layernorm` + `visual_projection`).

The global embedding of a target sequence is `visual_projection(post_layernorm(token))` with token the
CLS token (or the mean of the patch tokens), as CLIP computes its image embedding. This module is the
only one that reads or writes the file; the module that applies the head is `model/head.py`, built from
the tensors read here (docs/architecture.md §3.8).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .format import HEAD_FILE, DataError

KEYS = ("post_layernorm.weight", "post_layernorm.bias", "visual_projection.weight")
DEFAULT_EPS = 1e-5  # CLIP's LayerNorm epsilon, for heads that do not record theirs


@dataclass(frozen=True)
class HeadWeights:
    """The head's float32 tensors (keys as CLIP names them) and its LayerNorm epsilon."""

    tensors: dict[str, torch.Tensor]
    layer_norm_eps: float

    @property
    def token_dim(self) -> int:
        return int(self.tensors["post_layernorm.weight"].shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.tensors["visual_projection.weight"].shape[0])


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path / HEAD_FILE if path.is_dir() else path


def save_head(path: str | Path, ln_weight, ln_bias, projection, layer_norm_eps: float = DEFAULT_EPS) -> Path:
    """Writes the head (to a dataset folder or a file): LayerNorm weight/bias [Dt], projection [Dg, Dt]."""
    tensors = {k: torch.as_tensor(v).detach().to("cpu", torch.float32).contiguous()
               for k, v in zip(KEYS, (ln_weight, ln_bias, projection))}
    path = _resolve(path)
    _check(tensors, path)
    save_file(tensors, str(path), metadata={"layer_norm_eps": repr(float(layer_norm_eps))})
    return path


def read_head(path: str | Path, target_dim: int | None = None) -> HeadWeights | None:
    """The head of a dataset folder or file, None when there is none; a DataError when the file is damaged,
    holds other tensors, or (with `target_dim`) does not take target tokens of that dim."""
    path = _resolve(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key).float() for key in f.keys()}
            eps = float((f.metadata() or {}).get("layer_norm_eps", DEFAULT_EPS))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable safetensors file ({e}); rewrite the dataset's head") from None
    _check(tensors, path)
    head = HeadWeights(tensors, eps)
    if target_dim is not None and head.token_dim != target_dim:
        raise DataError(f"{path}: head input dim {head.token_dim} != target dim {target_dim}; "
                        f"write the head of the target encoder")
    return head


def _check(tensors: dict, path: Path) -> None:
    if set(tensors) != set(KEYS):
        held = ", ".join(sorted(tensors)) or "nothing"
        raise DataError(f"{path} must hold exactly {', '.join(KEYS)}; it holds {held}")
    w, b, p = (tensors[k] for k in KEYS)
    if w.dim() != 1 or b.shape != w.shape or p.dim() != 2 or p.shape[1] != w.shape[0]:
        raise DataError(f"{path}: head shapes {list(w.shape)}, {list(b.shape)}, {list(p.shape)} do not fit "
                        f"post_layernorm [Dt], [Dt] and visual_projection [Dg, Dt]")
