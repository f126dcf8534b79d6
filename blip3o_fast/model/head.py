"""The target encoder's global head and the global embedding of a token sequence (docs/architecture.md §3.8).

The weights come from the dataset's head.safetensors, read by `data.read_head` (its only reader).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError


class GlobalHead(nn.Module):
    """The target encoder's global head: post_layernorm then a bias-free visual_projection (CLIP's)."""

    def __init__(self, token_dim: int, embed_dim: int, eps: float = 1e-5):
        super().__init__()
        self.post_layernorm = nn.LayerNorm(token_dim, eps=eps)
        self.visual_projection = nn.Linear(token_dim, embed_dim, bias=False)

    @classmethod
    def from_weights(cls, tensors: dict[str, Tensor], layer_norm_eps: float) -> GlobalHead:
        """A frozen head from CLIP-named tensors: post_layernorm.{weight,bias} [Dt] and
        visual_projection.weight [Dg, Dt] (as `data.read_head` returns them)."""
        embed_dim, token_dim = tensors["visual_projection.weight"].shape
        head = cls(token_dim, embed_dim, layer_norm_eps)
        head.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
        return head.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.visual_projection.weight.dtype)
        return self.visual_projection(self.post_layernorm(x))


def global_embedding(tokens: Tensor, head: GlobalHead | None, mode: str, has_cls: bool) -> Tensor:
    """L2-normalised global embedding [B, Dg] of tokens [B, N, Dt]: the head on the CLS token (`cls`)
    or on the mean of the patch tokens, CLS excluded (`mean`); without a head, the pooled token itself."""
    if mode == "cls":
        if not has_cls:
            raise UserError("flow.head=cls needs target tokens with the CLS token first (task.target_cls=true); "
                            "use flow.head=mean")
        pooled = tokens[:, 0]
    elif mode == "mean":
        pooled = tokens[:, int(has_cls):].mean(dim=1)
    else:
        raise UserError(f"flow.head must be cls or mean, got {mode!r}")
    emb = head(pooled) if head is not None else pooled
    return F.normalize(emb.float(), dim=-1)
