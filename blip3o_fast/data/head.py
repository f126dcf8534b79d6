"""`head.safetensors`: the target encoder's global head (CLIP's `post_layernorm` + `visual_projection`).

The global embedding of a target sequence is `visual_projection(post_layernorm(token))` with token the
CLS token (or the mean of the patch tokens), as CLIP computes its image embedding. The module that
applies it lives in `blip3o_fast/flow.py`; this file only writes and reads the weights.
"""

from __future__ import annotations

from pathlib import Path

from .format import HEAD_FILE, DataError

KEYS = ("post_layernorm.weight", "post_layernorm.bias", "visual_projection.weight")


def save_head(path: str | Path, ln_weight, ln_bias, projection, layer_norm_eps: float = 1e-5) -> Path:
    """Writes the head: LayerNorm weight/bias [Dt], projection weight [Dg, Dt] (no bias)."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: torch.as_tensor(v).detach().to("cpu", torch.float32).contiguous()
               for k, v in zip(KEYS, (ln_weight, ln_bias, projection))}
    _check(tensors, Path(path))
    path = Path(path)
    if path.is_dir():
        path = path / HEAD_FILE
    save_file(tensors, str(path), metadata={"layer_norm_eps": repr(float(layer_norm_eps))})
    return path


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path / HEAD_FILE if path.is_dir() else path


def load_head(path: str | Path) -> dict | None:
    """The head tensors (float32, keys as CLIP names them) of a dataset folder or file; None if absent."""
    from safetensors.torch import load_file

    path = _resolve(path)
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise DataError(f"{path} is not a readable safetensors file ({e}); rewrite the dataset's head") from None
    _check(tensors, path)
    return tensors


def load_head_metadata(path: str | Path) -> dict[str, str]:
    """The head's metadata ({"layer_norm_eps": "1e-05"}); empty when there is no head."""
    from safetensors import safe_open

    path = _resolve(path)
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def head_eps(path: str | Path) -> float:
    """The head's LayerNorm epsilon (CLIP's 1e-5 when unrecorded)."""
    return float(load_head_metadata(path).get("layer_norm_eps", 1e-5))


def _check(tensors: dict, path: Path) -> None:
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; a head needs {', '.join(KEYS)}")
    w, b, p = (tensors[k] for k in KEYS)
    if w.dim() != 1 or b.shape != w.shape or p.dim() != 2 or p.shape[1] != w.shape[0]:
        raise DataError(f"{path}: head shapes {list(w.shape)}, {list(b.shape)}, {list(p.shape)} do not fit "
                        f"post_layernorm [Dt], [Dt] and visual_projection [Dg, Dt]")
