"""The DiT (docs/architecture.md §3.7): AdaLN-Zero blocks with self-attention, cross-attention to the condition, MLP.

    x = in_proj(x_t) [+ cond_add(cond)]     target tokens [B, Nt, Dt] -> [B, Nt, H], plus (model.cond_add) the
                                            projection of the condition patch of the same grid cell
    c = t_embedder(t)                       MLP(sinusoid(1000·t)): the AdaLN conditioning [B, H]
    e = cond_embed(cond) | null_cond        once per step, shared by every block's cross-attention
    kv = cond_kv(e)                         all blocks' cross-attention K and V in one GEMM
    x = blocks(x, c, kv)                    each branch opened by adaln_modulate, closed (and the next
                                            opened) by gated_residual_adaln
    velocity = out_proj(modulate(x))        zero-initialised, as every AdaLN gate: a new model is 0

The seams: block i's last `gated_residual_adaln` closes its MLP branch and opens block i+1's
attention branch (the head's norm after the last block), so every norm runs fused with a residual.
`model.fused_ops: false` runs the same graph on the ops' pure-PyTorch references.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..config import ConfigError, ModelConfig, TaskConfig
from ..errors import UserError
from .attention import attention, flash_available

FREQ_DIM = 256  # sinusoid width of the timestep embedding (DiT's frequency_embedding_size)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> MLP(sinusoid(1000·t)) [B, H], DiT's embedding on the 0..1000 scale it was tuned for."""

    def __init__(self, hidden_size: int, freq_dim: int = FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """[cos | sin] of t·max_period^(-i/half), i < half, in float32 [B, dim]."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        freq = self.sinusoid(1000.0 * t, self.freq_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class RotaryTables(nn.Module):
    """RoPE-3D cos/sin tables of the target (p_t = 0) and condition (p_t = 1) streams, kept in float64.

    They follow the model's device but never its dtype: model.bfloat16() must not round the angles
    (the ops take float32 tables, float64 ones for a float64 model). Not saved in the state dict.
    """

    def __init__(self, model: ModelConfig, task: TaskConfig):
        super().__init__()
        for stream, p_t, cls in (("target", 0, task.target_cls), ("cond", 1, task.cond_cls)):
            with torch.device("cpu"):  # real values even when the model is built on the meta device
                cos, sin = ops.rope3d_tables(task.grid, model.head_dim, model.rope_sections, model.rope_theta,
                                             p_t=p_t, cls=cls, dtype=torch.float64)
            self.register_buffer(f"{stream}_cos", cos.clone(), persistent=False)
            self.register_buffer(f"{stream}_sin", sin.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        for key, buf in self._buffers.items():
            self._buffers[key] = buf.to(device=fn(buf).device)  # device moves only
        return self

    def get(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(cos_target, sin_target, cos_cond, sin_cond) for q/k of `dtype`."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return tuple(t.to(acc) for t in (self.target_cos, self.target_sin, self.cond_cos, self.cond_sin))


def normalize_and_rotate(q: Tensor, k: Tensor, q_norm: nn.Module, k_norm: nn.Module, rope, o) -> tuple[Tensor, Tensor]:
    """qk-norm (RMSNorm with a weight, or none) then RoPE-3D (or none) of [B, S, nh, D] q and k: one fused op
    when both are on (it spares the norm's six elementwise passes forward and more backward)."""
    if rope is None:
        return q_norm(q), k_norm(k)
    if isinstance(q_norm, nn.RMSNorm):
        assert q_norm.eps == k_norm.eps, "the fused op takes one eps for q and k"
        return o.qk_norm_rope3d(q, k, q_norm.weight, k_norm.weight, q_norm.eps, *rope)[:2]
    return o.rope3d(q, k, *rope)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the target tokens: fused qkv, qk-norm, RoPE-3D on q and k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.backend = cfg.num_heads, cfg.attention
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: Tensor, rope: tuple[Tensor, ...] | None, o) -> Tensor:
        B, S, C = h.shape
        q, k, v = self.qkv(h).view(B, S, 3, self.num_heads, C // self.num_heads).unbind(2)  # [B, S, nh, D] views
        q, k = normalize_and_rotate(q, k, self.q_norm, self.k_norm, rope, o)
        return self.proj(attention(q, k, v, self.backend).flatten(2))


class CrossAttention(nn.Module):
    """Target queries attend to the condition; K and V come precomputed from the shared embedding e."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.backend = cfg.num_heads, cfg.attention
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: Tensor, kv: Tensor, rope: tuple[Tensor, ...] | None, o) -> Tensor:
        B, S, C = h.shape
        q = self.q(h).view(B, S, self.num_heads, C // self.num_heads)
        k, v = kv.unflatten(-1, (2, self.num_heads, C // self.num_heads)).unbind(2)  # [B, Nc, nh, D] views
        q, k = normalize_and_rotate(q, k, self.q_norm, self.k_norm, rope, o)
        return self.proj(attention(q, k, v, self.backend).flatten(2))


class Mlp(nn.Module):
    """SwiGLU (w2(silu(a)·b) with [a | b] = w1(h)) or GELU(tanh) MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        width = int(cfg.hidden_size * cfg.mlp_ratio)
        if self.swiglu:  # 2/3 of the width per branch keeps the parameter count of the GELU MLP
            width = 64 * math.ceil(2 * width / 3 / 64)
        self.w1 = nn.Linear(cfg.hidden_size, 2 * width if self.swiglu else width)
        self.w2 = nn.Linear(width, cfg.hidden_size)

    def forward(self, h: Tensor, o) -> Tensor:
        if self.swiglu:  # one fused pass over [a | b]; its backward writes the [a | b] gradient in place of a cat
            return self.w2(o.swiglu(self.w1(h)))
        return self.w2(nn.functional.gelu(self.w1(h), approximate="tanh"))


class DiTBlock(nn.Module):
    """Self-attention -> cross-attention -> MLP, each an AdaLN-Zero branch x + gate·f(modulate(N(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps, self.norm = cfg.norm_eps, cfg.norm
        self.attn = SelfAttention(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.mlp = Mlp(cfg)
        # (shift, scale, gate) for each of the three branches; zero-initialised so the block starts as identity
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 9 * cfg.hidden_size))

    def forward(self, x, h, mod, kv, rope_self, rope_cross, next_shift, next_scale, o) -> tuple[Tensor, Tensor]:
        """(x, h) -> (x, h): h is the attention input, opened by the previous seam with this block's
        (shift_msa, scale_msa); the last seam opens the next block (or the head) with next_shift/scale."""
        _, _, gate_msa, shift_mca, scale_mca, gate_mca, shift_mlp, scale_mlp, gate_mlp = mod
        x, h, _, _ = o.gated_residual_adaln(x, self.attn(h, rope_self, o), gate_msa, shift_mca, scale_mca,
                                            self.eps, self.norm)
        x, h, _, _ = o.gated_residual_adaln(x, self.cross_attn(h, kv, rope_cross, o), gate_mca, shift_mlp,
                                            scale_mlp, self.eps, self.norm)
        x, h, _, _ = o.gated_residual_adaln(x, self.mlp(h, o), gate_mlp, next_shift, next_scale, self.eps, self.norm)
        return x, h


class DiT(nn.Module):
    """Predicts the velocity x1 - x0 of target tokens x_t at time t, given condition tokens."""

    def __init__(self, model: ModelConfig, task: TaskConfig):
        super().__init__()
        if model.attention == "flash_attn" and not flash_available():
            raise ConfigError("model.attention=flash_attn but flash-attn is not installed: "
                              "pip install flash-attn, or use model.attention=auto")
        ops.select(model.fused_ops)  # a missing extension fails here, not at the first step
        self.config, self.task = model, task
        H = model.hidden_size
        self.in_proj = nn.Linear(task.target_dim, H)
        self.t_embedder = TimestepEmbedder(H)
        self.cond_add = nn.Linear(task.cond_dim, H) if model.cond_add else None
        self.cond_embed = nn.Sequential(nn.Linear(task.cond_dim, H), nn.LayerNorm(H, eps=model.norm_eps))
        self.null_cond = nn.Parameter(torch.zeros(task.cond_tokens, H))  # the "no condition" of CFG
        # learned positions only where RoPE does not relate the streams (docs/architecture.md §3.7.2)
        abs_target = not (model.rope and model.rope_cross)
        self.pos_embed = nn.Parameter(torch.zeros(task.target_tokens, H)) if abs_target else None
        self.cond_pos_embed = nn.Parameter(torch.zeros(task.cond_tokens, H)) if not model.rope_cross else None
        # a CLS token is another kind of token, not just another position: without a position table it gets
        # its own learned type embedding (as ViT's class token), else only attention patterns would tell it apart
        self.target_cls_embed = nn.Parameter(torch.zeros(H)) if task.target_cls and self.pos_embed is None else None
        self.cond_cls_embed = nn.Parameter(torch.zeros(H)) if task.cond_cls and self.cond_pos_embed is None else None
        self.rope = RotaryTables(model, task) if (model.rope or model.rope_cross) else None
        self.cond_kv = nn.Linear(H, model.depth * 2 * H)  # every block's cross-attention [K | V], one GEMM
        self.blocks = nn.ModuleList(DiTBlock(model) for _ in range(model.depth))
        # the head: modulated norm (its shift/scale open after the last block) and out_proj, zero-initialised
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(H, 2 * H))
        self.out_proj = nn.Linear(H, task.target_dim)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier linears, N(0, 0.02) embeddings, zero AdaLN modulations and output."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        for p in (self.null_cond, self.pos_embed, self.cond_pos_embed, self.target_cls_embed, self.cond_cls_embed):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # zero-out adaLN modulation layers and the output: every block is the identity, the velocity is 0
        for mod in [block.adaLN_modulation for block in self.blocks] + [self.final_adaLN_modulation]:
            nn.init.zeros_(mod[-1].weight)
            nn.init.zeros_(mod[-1].bias)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        c, t = self.config, self.task
        return (f"DiT {c.hidden_size}h x {c.depth} layers, {c.num_heads} heads, {c.mlp}, "
                f"cond [{t.cond_tokens}, {t.cond_dim}] -> target [{t.target_tokens}, {t.target_dim}]: "
                f"{self.num_parameters() / 1e6:.2f}M parameters")

    def _check_inputs(self, x_t: Tensor, t: Tensor, cond: Tensor, drop_cond: Tensor | None) -> None:
        task = self.task
        for name, x, tokens, dim, cls in (("x_t", x_t, task.target_tokens, task.target_dim, task.target_cls),
                                          ("cond", cond, task.cond_tokens, task.cond_dim, task.cond_cls)):
            if x.dim() != 3 or tuple(x.shape[1:]) != (tokens, dim):
                grid = "x".join(map(str, task.grid)) + (" + CLS" if cls else "")
                raise UserError(f"DiT got {name} of shape {list(x.shape)}, but task {task.name} expects "
                                f"[B, {tokens}, {dim}] ({grid} tokens of dim {dim})")
        B = x_t.shape[0]
        if cond.shape[0] != B or t.shape != (B,) or (drop_cond is not None and drop_cond.shape != (B,)):
            raise UserError(f"DiT batch mismatch: x_t {list(x_t.shape)}, t {list(t.shape)}, cond {list(cond.shape)}"
                            + (f", drop_cond {list(drop_cond.shape)}" if drop_cond is not None else ""))

    def _aligned_cond(self, a: Tensor, drop_cond: Tensor | None) -> Tensor:
        """Projected condition tokens a [B, Nc, H] laid out as the target tokens [B, Nt, H]: patch for patch (both
        streams share task.grid); the target CLS gets the condition CLS or the patch mean. Dropped rows are 0."""
        task = self.task
        patches = a[:, int(task.cond_cls):]
        if task.target_cls:
            cls = a[:, :1] if task.cond_cls else patches.mean(1, keepdim=True)
            patches = torch.cat((cls, patches), dim=1)
        if drop_cond is not None:  # the null condition adds nothing: CFG's unconditional branch sees no patch
            patches = patches.masked_fill(drop_cond.view(-1, 1, 1), 0.0)
        return patches

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor, drop_cond: Tensor | None = None) -> Tensor:
        """velocity [B, Nt, Dt] at (x_t [B, Nt, Dt], t [B]) given cond [B, Nc, Dc]; drop_cond [B] True -> null."""
        self._check_inputs(x_t, t, cond, drop_cond)
        cfg, o = self.config, ops.select(self.config.fused_ops)
        dtype = self.in_proj.weight.dtype
        B, H = x_t.shape[0], cfg.hidden_size

        x = self.in_proj(x_t.to(dtype))
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if self.target_cls_embed is not None:  # added to row 0 only; pad's backward is a slice, cat's a copy
            x = x + F.pad(self.target_cls_embed[None], (0, 0, 0, x.shape[1] - 1))
        if self.cond_add is not None:
            x = x + self._aligned_cond(self.cond_add(cond.to(dtype)), drop_cond)
        c = self.t_embedder(t)
        e = self.cond_embed(cond.to(dtype))
        if drop_cond is not None:
            e = torch.where(drop_cond.view(B, 1, 1), self.null_cond.to(e.dtype), e)
        if self.cond_pos_embed is not None:
            e = e + self.cond_pos_embed
        if self.cond_cls_embed is not None:
            e = e + F.pad(self.cond_cls_embed[None], (0, 0, 0, e.shape[1] - 1))
        # block i reads kv[i] [B, Nc, 2H]; unbind, not kv[:, :, i]: its backward is one stack, where per-block
        # slicing would zero-fill the whole stacked gradient once per block
        kv = self.cond_kv(e).unflatten(-1, (cfg.depth, 2 * H)).unbind(2)

        rope_self = rope_cross = None
        if self.rope is not None:
            cos_t, sin_t, cos_c, sin_c = self.rope.get(dtype)
            rope_self = (cos_t, sin_t, cos_t, sin_t) if cfg.rope else None
            rope_cross = (cos_t, sin_t, cos_c, sin_c) if cfg.rope_cross else None

        mods = [block.adaLN_modulation(c).chunk(9, dim=1) for block in self.blocks]  # [B, H] column views
        shift_out, scale_out = self.final_adaLN_modulation(c).chunk(2, dim=1)
        h, _, _ = o.adaln_modulate(x, mods[0][0], mods[0][1], cfg.norm_eps, cfg.norm)
        for i, block in enumerate(self.blocks):
            next_shift, next_scale = mods[i + 1][:2] if i + 1 < cfg.depth else (shift_out, scale_out)
            args = (x, h, mods[i], kv[i], rope_self, rope_cross, next_shift, next_scale, o)
            if cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, h = checkpoint(block, *args, use_reentrant=False)
            else:
                x, h = block(*args)
        return self.out_proj(h)
