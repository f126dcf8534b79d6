"""The encoders of `extract`, from Hugging Face `transformers` by name or local path.

A CLIP checkpoint loads as `CLIPModel` (its vision tower gives the tokens; its text tower embeds the
captions; its `post_layernorm` + `visual_projection` are saved as head.safetensors), a CLIP vision
checkpoint as `CLIPVisionModel`, anything else (EVA-CLIP-8B) through `AutoModel` (with
`--trust-remote-code`), using its `.vision_model` when it has one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .head import save_head


def require_extract_extra(what: str) -> None:
    """A one-line UserError when the `extract` extra (transformers, PIL) is not installed."""
    for module in ("transformers", "PIL"):
        try:
            __import__(module)
        except ModuleNotFoundError:
            raise UserError(f"{what} needs {module}, which is not installed: pip install 'blip3o-fast[extract]'") \
                from None


def _load(kind, name: str, what: str, **kw):
    """from_pretrained with the usual failures turned into one-line UserErrors."""
    try:
        return kind.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        text = str(e)
        if "trust_remote_code" in text:
            raise UserError(f"{what} {name} ships its own model code: pass --trust-remote-code if you trust "
                            f"it") from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise UserError(f"cannot load {what} {name!r} ({first}): give a Hugging Face model name or a local "
                        f"folder saved with save_pretrained") from None


def _config(name: str, trust: bool):
    from transformers import AutoConfig

    return _load(AutoConfig, name, "model config", trust_remote_code=trust)


class ClipText:
    """A CLIP model's text tower (captions -> projected embeddings) and its image head."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.dim = int(model.text_projection.out_features)
        self.device = next(model.parameters()).device
        limit = getattr(model.config.text_config, "max_position_embeddings", 77)
        self.max_length = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)

    @torch.no_grad()
    def embed(self, captions: list[str], chunk: int = 256) -> np.ndarray:
        """[n, Dg] float32 text embeddings (as CLIPModel.get_text_features computes them)."""
        out = []
        for i in range(0, len(captions), chunk):
            tok = self.tokenizer(captions[i:i + chunk], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            text = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            pooled = text.pooler_output
            out.append(self.model.text_projection(pooled).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def save_head(self, folder) -> Path:
        return save_clip_head(self.model, folder)


def save_clip_head(model, folder) -> Path:
    """head.safetensors from a CLIPModel: vision post_layernorm and visual_projection."""
    vision = model.vision_model
    return save_head(folder, vision.post_layernorm.weight, vision.post_layernorm.bias,
                     model.visual_projection.weight, vision.post_layernorm.eps)


def load_clip_text(name: str, model=None, device: str = "cpu") -> ClipText:
    """The text tower of a full CLIP checkpoint (CLIPModel), reusing `model` when it is already loaded."""
    require_extract_extra("embedding captions with a CLIP model")
    from transformers import AutoTokenizer, CLIPModel

    if model is None:
        config = _config(name, False)
        if config.model_type != "clip":
            raise UserError(f"{name} is a {config.model_type} model, not a full CLIP checkpoint with a text tower: "
                            f"give a CLIP model (e.g. openai/clip-vit-large-patch14)")
        model = _load(CLIPModel, name, "CLIP model").to(device).eval()
    return ClipText(model, _load(AutoTokenizer, name, "tokenizer of"), name)


class VisionEncoder:
    """A vision tower returning last-layer tokens [B, T, D] (CLS first when it has one)."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
        from transformers import AutoModel, CLIPModel, CLIPVisionModel

        self.name = name
        config = _config(name, trust_remote_code)
        self.clip = None
        if config.model_type == "clip":
            self.clip = _load(CLIPModel, name, "CLIP model", dtype=dtype)
            model = self.clip
            self.vision = self.clip.vision_model
        elif config.model_type == "clip_vision_model":
            model = _load(CLIPVisionModel, name, "CLIP vision model", dtype=dtype)
            self.vision = model.vision_model
        else:
            model = _load(AutoModel, name, "model", dtype=dtype, trust_remote_code=trust_remote_code)
            self.vision = getattr(model, "vision_model", model)
        model.to(device).eval()
        vc = getattr(config, "vision_config", config)
        self.patch_size = getattr(vc, "patch_size", None)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=pixels.to(self.device, self.dtype))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def layout(self, pixels: torch.Tensor) -> tuple[int, int, tuple[int, int], bool]:
        """(tokens, dim, grid, has_cls) from one probe forward pass."""
        tokens, dim = self(pixels).shape[1:]
        h, w = pixels.shape[-2:]
        if self.patch_size:
            grid = (h // self.patch_size, w // self.patch_size)
        else:
            side = int(round((tokens - 1) ** 0.5))
            grid = (side, side) if side * side == tokens - 1 else (int(round(tokens ** 0.5)),) * 2
        extra = tokens - grid[0] * grid[1]
        if extra not in (0, 1):
            raise UserError(f"{self.name} returns {tokens} tokens for a {grid[0]}x{grid[1]} patch grid: only "
                            f"patch tokens with an optional leading CLS token are supported")
        return tokens, dim, grid, extra == 1
