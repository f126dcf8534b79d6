"""Fine-tuning: `train.init_from=SOURCE` starts a run from trained weights, weights only (a new optimizer,
step 0, a fresh data stream), docs/architecture.md §3.11.

SOURCE is an export folder (`model.safetensors`), a complete checkpoint (`ema.safetensors`) or a run folder
(its newest complete checkpoint's EMA). Names and shapes must match the configured model exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UserError
from ..runtime.checkpoint import MARKER, Checkpointer

EXPORT_WEIGHTS = "model.safetensors"
CHECKPOINT_WEIGHTS = "ema.safetensors"


def weights_file(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if (path / EXPORT_WEIGHTS).is_file():
        return path / EXPORT_WEIGHTS
    if (path / MARKER).is_file() and (path / CHECKPOINT_WEIGHTS).is_file():
        return path / CHECKPOINT_WEIGHTS
    if (path / "checkpoints").is_dir():
        found = Checkpointer(path, 1, None).complete()
        if found:
            return found[-1] / CHECKPOINT_WEIGHTS
    raise UserError(f"train.init_from={source}: not an export folder ({EXPORT_WEIGHTS}), a complete checkpoint "
                    f"({MARKER} + {CHECKPOINT_WEIGHTS}) or a run folder with one; pass one of those")


def load_init_weights(model: torch.nn.Module, source: str | Path) -> Path:
    """Copies the source's weights into `model` (before DeepSpeed wraps it); returns the file read."""
    path = weights_file(source)
    weights = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes)) if keys]
        first = shapes[0] if shapes else None
        detail = f" ({first}: {tuple(weights[first].shape)} there, {tuple(own[first].shape)} here)" if first else ""
        raise UserError(f"train.init_from={source}: {path.name} does not fit the configured model ({'; '.join(parts)})"
                        f"{detail}; set model.* as the source was trained")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(weights[name])
    return path
