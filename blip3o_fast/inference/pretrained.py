"""`FeatureGenerator`: a trained model to use (docs/architecture.md §3.13).

    gen = FeatureGenerator.from_pretrained(path)     # a run folder, a checkpoint folder or an export folder
    feats = gen.generate(cond, steps=30, seed=0)     # cond [B, Nc, Dc] -> [B, Nt, Dt] float32
    emb = gen.image_embedding(feats)                 # the global (CLIP image) embedding, when there is a head
    gen.save_pretrained(out_dir)                     # what `blip3o-fast export` writes

Each sample's starting noise is drawn on the CPU from its own generator, seeded by (seed, its position in
the call) or (seed, its key): the noise does not depend on the batch size, the process count or the device's
random stream, and the ODE state is float32 whatever the model's dtype. Another batch size changes only the
rounding of batched matmuls (results agree to float32 rounding; bitwise with the same batching).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import RunConfig, from_dict, load_config
from ..data import DatasetStats, HeadWeights, read_head, read_stats
from ..errors import UserError
from ..model import DiT
from ..model.flow import sample
from ..model.head import GlobalHead, global_embedding
from ..model.normalize import FlowNorm, needs_stats
from ..runtime.checkpoint import MARKER, Checkpointer
from ..runtime.distributed import derived_seed
from .export import CONFIG_FILE, EVAL_FILE, EXPORT_FORMAT, LOSS_FILE, MODEL_FILE, write_export

RAW_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's module weights under ZeRO 0-2
WEIGHTS = ("ema", "raw")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
_NOT_A_MODEL = ("pass a folder `blip3o-fast export` wrote (model.safetensors + config.json), a run folder "
                "(config.yaml + checkpoints/) or a complete checkpoint folder")


@dataclass
class Provenance:
    """Where the weights came from; what an export's config.json and model card record."""

    weights: str
    step: int | None = None
    data_path: str | None = None
    data_manifest_sha256: str | None = None
    source: str | None = None
    # files an export copies: eval.json (the newest evaluation) and loss.png
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"weights": self.weights, "step": self.step, "data_path": self.data_path,
                "data_manifest_sha256": self.data_manifest_sha256, "source": self.source}


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or a one-line UserError naming it (missing, truncated, corrupt)."""
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name} ({what}): {_NOT_A_MODEL}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}): it is truncated or "
                        f"corrupt; export the model again") from None


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _raw_weights(checkpoint: Path, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The trained (not averaged) weights: the module state DeepSpeed saved, full under ZeRO 0-2."""
    if cfg.train.zero_stage == 3:
        raise UserError(f"{checkpoint} was saved under ZeRO-3, whose raw weights are partitioned across ranks: "
                        f"use the EMA weights (--weights ema) or consolidate with DeepSpeed's zero_to_fp32.py")
    path = checkpoint / RAW_FILE
    if not path.is_file():
        raise UserError(f"{checkpoint} has no {RAW_FILE} (DeepSpeed's model states) to take raw weights from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)["module"]
    except Exception as e:  # a damaged pickle fails in many ways; all of them mean the same to the user
        raise UserError(f"{path} is not a readable DeepSpeed model state ({type(e).__name__}: {e})") from None
    return {k: v.float().contiguous() for k, v in state.items()}


def _newest_eval(run_dir: Path) -> Path | None:
    reports = sorted((run_dir / "eval").glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    return reports[-1] if reports else None


def resolve(path: str | Path, weights: str | None) -> tuple[RunConfig, dict, HeadWeights | None, Provenance,
                                                           DatasetStats | None]:
    """(config, float32 weights, head, provenance, normalisation statistics) of a run, checkpoint or export folder."""
    folder = Path(path).expanduser()
    if weights is not None and weights not in WEIGHTS:
        raise UserError(f"weights must be ema or raw, got {weights!r}")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a model folder (it does not exist or is a file): {_NOT_A_MODEL}")
    if (folder / CONFIG_FILE).is_file() or (folder / MODEL_FILE).is_file():
        return _resolve_export(folder, weights)
    run_dir = None
    if (folder / MARKER).is_file():
        checkpoint = folder
        if folder.parent.name == "checkpoints" and (folder.parent.parent / "config.yaml").is_file():
            run_dir = folder.parent.parent
    elif (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
        run_dir = folder
        complete = Checkpointer(folder, keep_last=1, dist=None).complete()
        if not complete:
            raise UserError(f"{folder} has no complete checkpoint (a folder with a {MARKER} marker) to load")
        checkpoint = complete[-1]
    elif (folder / "ema.safetensors").is_file():
        raise UserError(f"{folder} is not a complete checkpoint (no {MARKER} marker): its save was interrupted")
    else:
        raise UserError(f"{folder} is not a model folder: {_NOT_A_MODEL}")
    cfg = load_config(checkpoint / "config.yaml")
    weights = weights or "ema"
    if weights == "ema":
        state = read_safetensors(checkpoint / "ema.safetensors", "the EMA weights")
    else:
        state = _raw_weights(checkpoint, cfg)
    data = Path(cfg.data.path)
    head = read_head(data, cfg.task.target_dim) if data.is_dir() else None
    stats = (read_stats(data, cfg.task.cond_dim, cfg.task.target_dim)
             if data.is_dir() and needs_stats(cfg.flow) else None)
    meta = json.loads((checkpoint / "meta.json").read_text()) if (checkpoint / "meta.json").is_file() else {}
    files = {}
    if run_dir is not None:
        newest = _newest_eval(run_dir)
        files = {name: p for name, p in ((EVAL_FILE, newest), (LOSS_FILE, run_dir / LOSS_FILE))
                 if p is not None and p.is_file()}
    prov = Provenance(weights, meta.get("step"), str(data), _sha256(data / "manifest.json"), str(checkpoint), files)
    return cfg, state, head, prov, stats


def _resolve_export(folder: Path, weights: str | None):
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{folder} has {MODEL_FILE} but no {CONFIG_FILE}: export the model again")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({e}): export the model again") from None
    if not isinstance(raw, dict) or raw.get("format") != "blip3o-fast" or raw.get("format_version") != EXPORT_FORMAT:
        raise UserError(f"{config_path} is not a blip3o-fast export config (format blip3o-fast, format_version "
                        f"{EXPORT_FORMAT}): {_NOT_A_MODEL}")
    cfg = from_dict({k: raw[k] for k in ("task", "model", "flow", "eval") if k in raw})
    training = raw.get("training") if isinstance(raw.get("training"), dict) else {}
    prov = Provenance(**{"weights": "ema", **{k: v for k, v in training.items() if k in Provenance.__dataclass_fields__
                                              and k != "files"}})
    if weights is not None and weights != prov.weights:
        raise UserError(f"{folder} holds the {prov.weights} weights only; export the run with --weights {weights}")
    prov.files = {name: folder / name for name in (EVAL_FILE, LOSS_FILE) if (folder / name).is_file()}
    state = read_safetensors(folder / MODEL_FILE, "the model weights")
    head = read_head(folder, cfg.task.target_dim)
    stats = read_stats(folder, cfg.task.cond_dim, cfg.task.target_dim) if needs_stats(cfg.flow) else None
    return cfg, state, head, prov, stats


def _as_tensor(x, name: str) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x), True
    if isinstance(x, torch.Tensor):
        return x, False
    raise UserError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little") & ((1 << 63) - 1)


class FeatureGenerator:
    """A trained DiT ready to generate target tokens from condition tokens (docs/architecture.md §3.13)."""

    def __init__(self, cfg: RunConfig, state: dict[str, torch.Tensor], head: HeadWeights | None,
                 provenance: Provenance, device: str | torch.device | None = None, dtype=None,
                 stats: DatasetStats | None = None):
        self.cfg, self.state, self.head_weights, self.provenance = cfg, state, head, provenance
        self.stats = stats  # the training data's statistics: the flow's normalisation (§3.1.1)
        self.norm = FlowNorm(cfg.flow, stats.tensors() if stats is not None else None)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise UserError(f"dtype must be one of {', '.join(_DTYPES)} or a torch dtype, got {dtype!r}")
            dtype = _DTYPES[dtype]
        self.dtype = dtype
        model = DiT(cfg.model, cfg.task)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{provenance.source}: the weights do not fit the model config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}): export the model again")
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.head = GlobalHead.from_weights(head.tensors, head.layer_norm_eps) if head is not None else None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype=None,
                        weights: str | None = None) -> FeatureGenerator:
        """Loads a run folder (its newest complete checkpoint), a checkpoint folder or an export folder. `weights`:
        ema (default for runs and checkpoints) or raw (DeepSpeed's module weights; ZeRO 0-2)."""
        cfg, state, head, provenance, stats = resolve(path, weights)
        return cls(cfg, state, head, provenance, device, dtype, stats)

    @property
    def task(self):
        return self.cfg.task

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def _check(self, x, name: str, tokens: int, dim: int, what: str) -> tuple[torch.Tensor, bool]:
        x, was_numpy = _as_tensor(x, name)
        if not x.is_floating_point():
            raise UserError(f"{name} must be floating point (float16, bfloat16 or float32), got {x.dtype}")
        if x.dim() != 3 or tuple(x.shape[1:]) != (tokens, dim):
            raise UserError(f"{name} of shape {list(x.shape)} does not fit this model: expected [B, {tokens}, {dim}] "
                            f"({what} of task {self.task.name})")
        return x, was_numpy

    @torch.no_grad()
    def generate(self, cond, steps: int = 30, sampler: str = "euler", guidance_scale: float = 1.0,
                 timestep_shift: float = 1.0, seed: int = 0, batch_size: int = 256,
                 keys: Sequence[str] | None = None):
        """Target tokens [B, Nt, Dt] float32 (numpy for numpy input, else a CPU tensor) from cond [B, Nc, Dc].

        Sample i starts from noise seeded by (seed, i), or by (seed, keys[i]) when keys are given (what
        `blip3o-fast generate` does, so a sample's result does not depend on where it sits in the data)."""
        task = self.task
        cond, was_numpy = self._check(cond, "cond", task.cond_tokens, task.cond_dim, "condition tokens")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if keys is not None and len(keys) != cond.shape[0]:
            raise UserError(f"got {len(keys)} keys for {cond.shape[0]} conditions: give one key per sample")
        seeds = ([derived_seed(seed, _key_seed(k)) for k in keys] if keys is not None
                 else [derived_seed(seed, i) for i in range(cond.shape[0])])
        shape = (task.target_tokens, task.target_dim)
        out = []
        for start in range(0, cond.shape[0], batch_size):
            chunk = seeds[start:start + batch_size]
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in chunk])
            c = self.norm.cond(cond[start:start + batch_size].to(self.device, torch.float32)).to(self.dtype)
            x = sample(self.model, c, steps, sampler, timestep_shift, guidance_scale, noise=noise.to(self.device))
            out.append(self.norm.target.inverse(x.float().cpu()))
        feats = torch.cat(out) if out else torch.zeros((0, *shape))
        return feats.numpy() if was_numpy else feats

    @torch.no_grad()
    def image_embedding(self, feats):
        """L2-normalised global embeddings [B, Dg] of target tokens through the bundled head (flow.head: the CLS
        token, or the patch mean when the target has no CLS), as CLIP computes its image embedding."""
        if self.head is None:
            raise UserError("this model has no global head (its dataset had no head.safetensors): "
                            "image_embedding needs one")
        task = self.task
        feats, was_numpy = self._check(feats, "feats", task.target_tokens, task.target_dim, "target tokens")
        mode = self.cfg.flow.head if task.target_cls else "mean"
        emb = global_embedding(feats.float().cpu(), self.head, mode, task.target_cls)
        return emb.numpy() if was_numpy else emb

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Writes the export folder (model.safetensors, config.json, head, eval.json, loss.png, README.md)."""
        return write_export(self, Path(out_dir))
