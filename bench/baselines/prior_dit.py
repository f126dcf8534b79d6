"""The speed baseline: an eager DiT in the style of the prior projects' base model.

What made it slow, kept on purpose so the speed-up over what users had is a measured ratio:
  - the raw condition ([B, Nc, cond_dim], e.g. 4096-d EVA-CLIP) is projected to the hidden size
    inside *every* block (41% of the prior base model's FLOPs), instead of once per step;
  - attention is an explicit softmax(QK^T / sqrt(d)) V, materialising the score matrix;
  - norms, modulation, residual gates and the RoPE are separate unfused eager ops;
  - fp16 autocast on GPU (fp32 on CPU).
Same sizes as our DiT (hidden, depth, heads, MLP ratio), same inputs and outputs, same loss. It is a
timing baseline only: its maths (RoPE included) is written plainly, not to be trained with.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def explicit_attention(q, k, v):
    """[B, H, S, D] softmax attention with the score matrix materialised."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1) @ v


def rotate_half_rope(x, cos, sin):
    """Unfused rotary embedding on [B, H, S, D] (split-halves form)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


class PriorBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, cond_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.cond_proj = nn.Linear(cond_dim, hidden)  # the per-block projection of the raw condition
        self.cross_q = nn.Linear(hidden, hidden)
        self.cross_kv = nn.Linear(hidden, 2 * hidden)
        self.cross_out = nn.Linear(hidden, hidden)
        self.norm3 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def _heads(self, x):
        B, S, C = x.shape
        return x.view(B, S, self.heads, C // self.heads).transpose(1, 2)

    def forward(self, x, c, cond, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale1[:, None]) + shift1[:, None]
        q, k, v = (self._heads(t) for t in self.qkv(h).chunk(3, dim=-1))
        q, k = rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin)
        x = x + gate1[:, None] * self.attn_out(explicit_attention(q, k, v).transpose(1, 2).flatten(2))
        e = self.cond_proj(cond)
        ck, cv = (self._heads(t) for t in self.cross_kv(e).chunk(2, dim=-1))
        cq = self._heads(self.cross_q(self.norm2(x)))
        x = x + self.cross_out(explicit_attention(cq, ck, cv).transpose(1, 2).flatten(2))
        h = self.norm3(x) * (1 + scale2[:, None]) + shift2[:, None]
        return x + gate2[:, None] * self.mlp(h)


class PriorStyleDiT(nn.Module):
    """Velocity model with the prior projects' structure; forward(x_t, t, cond) like our DiT."""

    def __init__(self, hidden: int, depth: int, heads: int, cond_dim: int, target_dim: int, target_tokens: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.in_proj = nn.Linear(target_dim, hidden)
        self.pos_embed = nn.Parameter(torch.zeros(1, target_tokens, hidden))
        self.t_mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(PriorBlock(hidden, heads, cond_dim, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out_proj = nn.Linear(hidden, target_dim)
        head_dim = hidden // heads
        inv = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        ang = torch.arange(target_tokens, dtype=torch.float32)[:, None] * inv[None]
        self.register_buffer("cos", torch.cat((ang.cos(), ang.cos()), -1)[:, : head_dim // 2], persistent=False)
        self.register_buffer("sin", torch.cat((ang.sin(), ang.sin()), -1)[:, : head_dim // 2], persistent=False)

    def forward(self, x_t, t, cond):
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        c = self.t_mlp(torch.cat((args.cos(), args.sin()), dim=-1).to(self.in_proj.weight.dtype))
        x = self.in_proj(x_t) + self.pos_embed
        for block in self.blocks:
            x = block(x, c, cond, self.cos, self.sin)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        return self.out_proj(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])


def prior_training_loss(model, target, cond, generator):
    """Rectified flow on the same convention as ours (x_t = (1 - t)·x0 + t·x1, u = x1 - x0), unfused."""
    x1 = target
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    t = torch.rand(x1.shape[0], generator=generator, device=x1.device)
    tt = t[:, None, None].to(x1.dtype)
    x_t = (1 - tt) * x0 + tt * x1
    v = model(x_t, t, cond)
    return F.mse_loss(v.float(), (x1 - x0).float())
