"""The run configuration's schema: one dataclass per section, each validating itself in
`__post_init__` with a one-line `ConfigError`. The attribute docstrings under the fields are the
documentation (`config/reference.py` renders them into the README)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message is one line naming the key and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# the choice lists, one home each: the CLI's choices and the model's dispatch read them from here
TASKS = ("eva_to_clip", "clip_to_eva")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash_attn", "math")
NORM_MODES = ("channel", "global", "none")


def _one_of(value: Any, allowed: tuple, key: str) -> None:
    _require(value in allowed, f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass
class TaskConfig:
    """What is generated from what: the two token streams and their layout."""

    name: str = "eva_to_clip"
    """eva_to_clip (condition on EVA-CLIP, generate CLIP) or clip_to_eva (the reverse)"""
    cond_dim: int = 4096
    """feature dim of the condition tokens"""
    target_dim: int = 1024
    """feature dim of the generated (target) tokens"""
    grid: tuple[int, int] = (16, 16)
    """patch grid (gh, gw) of both streams; tokens are row-major"""
    target_cls: bool = False
    """target sequence carries the CLS token first (257 tokens for a 16x16 grid)"""
    cond_cls: bool = False
    """condition sequence carries the CLS token first"""

    def __post_init__(self):
        self.grid = tuple(self.grid)
        _one_of(self.name, TASKS, "task.name")
        _require(self.cond_dim > 0 and self.target_dim > 0, "task.cond_dim and task.target_dim must be positive")
        _require(len(self.grid) == 2 and min(self.grid) > 0, f"task.grid must be two positive ints, got {self.grid}")

    @property
    def target_tokens(self) -> int:
        return self.grid[0] * self.grid[1] + int(self.target_cls)

    @property
    def cond_tokens(self) -> int:
        return self.grid[0] * self.grid[1] + int(self.cond_cls)


@dataclass
class ModelConfig:
    """The DiT (docs/architecture.md §3.7); the shipped configs model/{tiny,small,base,large} are the named sizes."""

    hidden_size: int = 768
    """width H of the transformer"""
    depth: int = 12
    """number of DiT blocks"""
    num_heads: int = 12
    """attention heads; must divide hidden_size"""
    mlp_ratio: float = 4.0
    """MLP width / H (SwiGLU uses 2/3 of it per branch, rounded up to a multiple of 64, as LLaMA)"""
    mlp: str = "swiglu"
    """swiglu or gelu"""
    norm: str = "layer"
    """normalization of the AdaLN seams: layer or rms"""
    norm_eps: float = 1e-6
    """epsilon of every normalization in the model"""
    qk_norm: bool = True
    """RMSNorm of q and k per head before RoPE and attention"""
    rope: bool = True
    """3-axis RoPE on self-attention q/k (no learned position table when on)"""
    rope_cross: bool = True
    """RoPE on cross-attention q (target, p_t=0) and k (condition, p_t=1); without it both streams get
    learned position tables so a target patch can still find its condition patch"""
    cond_add: bool = False
    """also add a projection of each condition patch to the target token of the same grid cell (the target CLS
    gets the patch mean, or the condition CLS): every target token starts from its own patch's condition instead
    of having to find it through cross-attention (docs/recipe.md measures it)"""
    rope_sections: tuple[int, int, int] | None = None
    """(d_t, d_h, d_w) split of the head dim; default D/4 for t, the rest split between h and w"""
    rope_theta: float = 10000.0
    """RoPE base θ"""
    attention: str = "auto"
    """auto (flash-attn if installed and supported, else SDPA), sdpa, flash_attn or math"""
    fused_ops: bool = True
    """run the compiled fused ops; false runs their pure-PyTorch references"""
    cond_drop: float = 0.1
    """probability of replacing the condition by the learned null condition (classifier-free guidance)"""
    activation_checkpointing: bool = False
    """recompute each block in backward instead of storing its activations (training only)"""

    def __post_init__(self):
        if self.rope_sections is not None:
            self.rope_sections = tuple(self.rope_sections)
        _require(self.hidden_size > 0 and self.depth > 0 and self.num_heads > 0,
                 "model.hidden_size, model.depth and model.num_heads must be positive")
        _require(self.hidden_size % self.num_heads == 0,
                 f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size}")
        _require(self.mlp_ratio > 0, f"model.mlp_ratio must be positive, got {self.mlp_ratio}")
        _require(self.norm_eps > 0, f"model.norm_eps must be positive, got {self.norm_eps}")
        _require(self.rope_theta > 1, f"model.rope_theta must be > 1, got {self.rope_theta}")
        _one_of(self.mlp, ("swiglu", "gelu"), "model.mlp")
        _one_of(self.norm, ("layer", "rms"), "model.norm")
        _one_of(self.attention, ATTENTION_BACKENDS, "model.attention")
        _require(0.0 <= self.cond_drop < 1.0, f"model.cond_drop must be in [0, 1), got {self.cond_drop}")
        if self.rope or self.rope_cross:
            head_dim = self.hidden_size // self.num_heads
            _require(head_dim % 2 == 0, f"RoPE needs an even head dim, got {head_dim} (hidden_size / num_heads)")
            if self.rope_sections is not None:
                _require(len(self.rope_sections) == 3 and all(d >= 0 and d % 2 == 0 for d in self.rope_sections)
                         and sum(self.rope_sections) == head_dim,
                         f"model.rope_sections {list(self.rope_sections)} must be three even numbers summing to "
                         f"the head dim {head_dim} (hidden_size / num_heads)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class FlowConfig:
    """Rectified flow (docs/architecture.md §3.1): t = 0 is noise, t = 1 is data."""

    timestep_sampling: str = "logit_normal"
    """training t: uniform, logit_normal (sigmoid of N(logit_mean, logit_std)) or beta(beta_a, beta_b)"""
    logit_mean: float = 0.0
    """mean of the normal whose sigmoid is t (logit_normal)"""
    logit_std: float = 1.0
    """standard deviation of that normal (logit_normal)"""
    beta_a: float = 1.0
    """first shape parameter of beta(a, b) timesteps"""
    beta_b: float = 1.0
    """second shape parameter of beta(a, b) timesteps"""
    contrastive_weight: float = 0.0
    """weight of the auxiliary InfoNCE term on global embeddings of x̂1 (off by default)"""
    contrastive_temperature: float = 0.07
    """temperature of that InfoNCE term"""
    cls_loss_weight: float = 0.0
    """extra weight of the target CLS token's velocity error: loss += w·mean((v - u)²) over the CLS token alone. In
    the plain mean the CLS is 1 of Nt tokens, yet the image embedding (retrieval) is made from it alone"""
    head: str = "cls"
    """global embedding for retrieval: cls (CLS token through the head) or mean (patch mean through it)"""
    target_norm: str = "none"
    """the flow runs on (target - mean) / std with the dataset's train-split statistics (stats.safetensors):
    channel (per channel), global (one scalar pair) or none; sampling de-normalises"""
    cond_norm: str = "none"
    """the same for the condition tokens the model reads: channel, global or none"""

    def __post_init__(self):
        _one_of(self.timestep_sampling, ("uniform", "logit_normal", "beta"), "flow.timestep_sampling")
        _one_of(self.head, ("cls", "mean"), "flow.head")
        _one_of(self.target_norm, NORM_MODES, "flow.target_norm")
        _one_of(self.cond_norm, NORM_MODES, "flow.cond_norm")
        _require(self.logit_std > 0 and self.beta_a > 0 and self.beta_b > 0,
                 "flow.logit_std, flow.beta_a and flow.beta_b must be positive")
        _require(self.cls_loss_weight >= 0, f"flow.cls_loss_weight must be >= 0, got {self.cls_loss_weight}")
        _require(self.contrastive_weight >= 0 and self.contrastive_temperature > 0,
                 "flow.contrastive_weight must be >= 0 and flow.contrastive_temperature > 0")


@dataclass
class DataConfig:
    """Where the shards are and how they are read (docs/architecture.md §3.9)."""

    path: str = "demo/data"
    """dataset folder holding manifest.json"""
    train_split: str = "train"
    """split that training streams read"""
    eval_split: str = "eval"
    """held-out split that evaluation reads"""
    batch_size: int = 32
    """per-rank micro-batch size"""
    num_workers: int = 2
    """DataLoader worker processes per rank (batches are formed in them); 0 reads in the main process"""
    shuffle_buffer: int = 1000
    """about this many samples (whole shards) are read in one random order; 0 reads each shard in order"""
    pin_memory: bool = True
    """pin batches in page-locked memory for faster host-to-GPU copies (only when a GPU is used)"""

    def __post_init__(self):
        _require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


@dataclass
class TrainConfig:
    """The training engine (docs/architecture.md §3.10)."""

    out_dir: str = "runs/default"
    """run folder: config.yaml, metrics.jsonl, tb/, checkpoints/, eval/, loss.png"""
    steps: int = 10000
    """optimizer steps to train for"""
    lr: float = 2e-4
    """peak learning rate (AdamW)"""
    min_lr: float = 1e-5
    """learning rate at the end of the cosine decay"""
    warmup_steps: int = 500
    """linear warmup steps from 0 to lr"""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on biases and norms)"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    grad_clip: float = 1.0
    """max global grad norm; 0 disables clipping"""
    grad_accum: int = 1
    """micro-batches per optimizer step (global batch = batch_size x grad_accum x ranks)"""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (DDP-like), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)"""
    precision: str = "auto"
    """auto (bf16 on a GPU that supports it, else fp16; fp32 on CPU), bf16, fp16 (DeepSpeed's dynamic loss
    scaling; GPU only) or fp32"""
    deepspeed_config: str | None = None
    """a DeepSpeed JSON merged over the generated config (offload, buckets, comms dtype, flops profiler);
    keys our config also sets must be "auto" or agree with it"""
    compile: bool = False
    """torch.compile the DiT (in place; the fused ops stay opaque kernels inside the graph): faster steps after
    a compile of tens of seconds"""
    ema_decay: float = 0.999
    """decay of the exponential moving average of the weights (warmed up as min(decay, (1+s)/(10+s)))"""
    seed: int = 0
    """seeds the initial weights, the data order and every step's noise, timesteps and condition drops"""
    log_every: int = 10
    """steps between metrics.jsonl / TensorBoard records"""
    ckpt_every: int = 1000
    """steps between checkpoints (one is also written at the end and on SIGTERM/SIGINT)"""
    keep_last: int = 3
    """complete checkpoints kept; older ones are pruned once a newer one is complete"""
    eval_every: int = 0
    """steps between held-out evaluations during training; 0 disables them"""
    eval_samples: int = 256
    """held-out samples of each evaluation during training"""
    max_nonfinite: int = 10
    """consecutive non-finite steps after which the run stops (with a checkpoint)"""
    profile: bool = False
    """record train.profile_steps with torch.profiler: a Chrome trace and a memory snapshot per rank in
    <run>/profile/"""
    profile_steps: tuple[int, int] = (10, 13)
    """[start, end) step window of the profile (after warm-up; a few steps: traces are large)"""
    init_from: str | None = None
    """fine-tune: start from these weights (an export folder, a complete checkpoint or a run folder: its EMA
    weights), with a new optimizer at step 0; a run folder with its own checkpoint resumes from that instead"""
    wandb: bool = False
    """also log to Weights & Biases (imported only when true)"""
    wandb_project: str = "blip3o-fast"
    """wandb project name"""
    wandb_entity: str | None = None
    """wandb entity (team or user); none is your default entity"""
    wandb_name: str | None = None
    """wandb run name; none is the run folder's name"""
    wandb_group: str | None = None
    """wandb group (e.g. one sweep or ablation)"""
    wandb_tags: tuple[str, ...] = ()
    """wandb tags; the run id is kept in <run>/wandb_run_id, so a resumed run continues the same W&B run"""

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.wandb_tags = tuple(self.wandb_tags)
        self.profile_steps = tuple(self.profile_steps)
        _require(len(self.profile_steps) == 2 and 0 <= self.profile_steps[0] < self.profile_steps[1],
                 f"train.profile_steps must be [start, end) with 0 <= start < end, got {list(self.profile_steps)}")
        _require(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _require(self.lr > 0 and 0 <= self.min_lr <= self.lr, "train.lr must be > 0 and 0 <= train.min_lr <= train.lr")
        _require(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _require(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _require(self.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _one_of(self.precision, ("auto", "bf16", "fp16", "fp32"), "train.precision")
        _require(0.0 <= self.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        _require(self.grad_clip >= 0, "train.grad_clip must be >= 0")
        _require(self.log_every >= 1 and self.ckpt_every >= 1 and self.keep_last >= 1,
                 "train.log_every, train.ckpt_every and train.keep_last must be >= 1")
        _require(self.max_nonfinite >= 1, "train.max_nonfinite must be >= 1")


@dataclass
class EvalConfig:
    """Sampling-based evaluation (docs/architecture.md §3.12)."""

    steps: int = 50
    """ODE steps of the sampler (t: 0 -> 1; Heun calls the model twice per step)"""
    sampler: str = "euler"
    """euler or heun"""
    guidance_scale: float = 1.0
    """classifier-free guidance scale: v_null + g·(v_cond - v_null); 1 is none"""
    timestep_shift: float = 1.0
    """s > 1 spends more sampling steps near the noise end: noise level σ = 1 - t maps to
    s·σ / (1 + (s - 1)·σ), as SD3 does; 1 is none"""
    batch_size: int = 64
    """samples per sampling batch (per rank)"""
    max_samples: int = 0
    """evaluate at most this many held-out samples; 0 is all"""

    def __post_init__(self):
        _one_of(self.sampler, ("euler", "heun"), "eval.sampler")
        _require(self.guidance_scale >= 0, f"eval.guidance_scale must be >= 0, got {self.guidance_scale}")
        _require(self.timestep_shift > 0, f"eval.timestep_shift must be positive, got {self.timestep_shift}")
        _require(self.steps >= 1 and self.batch_size >= 1, "eval.steps and eval.batch_size must be >= 1")
        _require(self.max_samples >= 0, "eval.max_samples must be >= 0")


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        _require(self.flow.cls_loss_weight == 0 or self.task.target_cls,
                 "flow.cls_loss_weight > 0 weighs the target CLS token, but task.target_cls is false; set it to 0")

    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the dict dumps to plain YAML."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
