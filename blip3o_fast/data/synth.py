"""`data synth`: a deterministic synthetic dataset with a learnable, non-trivial cond -> target relation.

Each sample has a latent z ~ N(0, I). Both streams are functions of (z, grid position) through fixed
random two-layer tanh maps, different ones per stream, plus a little noise:

    cond[s]     = C2 · tanh(C1 · z + Pc · pos(s) + c0)                                (condition encoder)
    target[s]   = T2 · (tanh(T1 · z + Pt · pos(s) + t0) ⊙ tanh(G1 · z + Pg · pos(s) + g0))   (target patches)
    target[CLS] = K2 · tanh(K1 · z + k0)                                              (a summary of z)

pos(s) is a smooth sinusoidal code of the patch's (row, column), so the relation is position dependent,
and a target patch is a nonlinear function of the condition patch at the same grid cell (which pins down
z and the position), not a linear copy of it: the best linear map from a condition patch to its target
patch explains only ~60% of the target's variance (the product of two tanh features is what a linear
fit misses), while a small network learns it. Every stream is scaled to unit RMS per element.

The head (`post_layernorm` + `visual_projection`) is random; the caption embeddings of a sample are
noisy copies of its normalized global embedding head(target[CLS]), so the oracle (true CLS through the
head) retrieves its captions well above chance, and a model that generates the right CLS does too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .format import SCALES, STORAGES, StreamSpec, TextSpec, stream_names
from .head import save_head
from .writer import ShardSetWriter, prepare_output, save_manifest

CALIBRATION = 2048  # latents that fix the CLS scale (16 of them, times every token, fix the patch streams')

PRESETS = {
    # the embedded demo: trains in minutes on CPU with the tiny model
    "demo": dict(grid=(8, 8), cond_dim=64, target_dim=32, text_dim=16, target_cls=True),
    # the real shapes: EVA-CLIP-8B [256, 4096] -> CLIP ViT-L/14 [256, 1024], 768-d CLIP embeddings
    "real": dict(grid=(16, 16), cond_dim=4096, target_dim=1024, text_dim=768, target_cls=False),
}


@dataclass
class SynthSpec:
    """Every knob of the generator; the same spec and seed give the same bytes."""

    seed: int = 0
    train_samples: int = 4096
    eval_samples: int = 256
    shard_size: int = 512
    grid: tuple[int, int] = (8, 8)
    cond_dim: int = 64
    target_dim: int = 32
    target_cls: bool = True
    cond_cls: bool = False
    text_dim: int = 16
    captions: tuple[int, int] = (2, 5)
    latent_dim: int = 8
    hidden: int = 96
    noise: float = 0.02
    caption_noise: float = 0.25
    outlier_channels: int = 0
    outlier_scale: float = 30.0
    task: str = "eva_to_clip"
    storage: str = "float"  # of the condition: float (float16) or int8 (§3.9.6)
    storage_target: str = "float"
    int8_scale: str = "channel"  # what one int8 scale covers: channel (of each sample) or token
    splits: dict = field(default_factory=lambda: {"train": 0, "eval": 1})

    def __post_init__(self):
        from ..errors import UserError

        checks = [
            (self.train_samples >= 0 and self.eval_samples >= 0, "sample counts must be >= 0"),
            (self.shard_size >= 1, "--shard-size must be >= 1"),
            (len(self.grid) == 2 and min(self.grid) >= 1, "--grid must be two positive ints"),
            (min(self.cond_dim, self.target_dim, self.text_dim, self.latent_dim, self.hidden) >= 1,
             "dims must be >= 1"),
            (1 <= self.captions[0] <= self.captions[1], "--captions MIN MAX needs 1 <= MIN <= MAX"),
            (self.noise >= 0 and self.caption_noise >= 0, "noise levels must be >= 0"),
            (0 <= self.outlier_channels <= min(self.cond_dim, self.target_dim) and self.outlier_scale > 0,
             "--outlier-channels must be in [0, min(cond dim, target dim)] and --outlier-scale > 0"),
            ({self.storage, self.storage_target} <= set(STORAGES) and self.int8_scale in SCALES,
             f"storage must be one of {', '.join(STORAGES)} and the int8 scale one of {', '.join(SCALES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"data synth: {message}")


class SynthWorld:
    """The fixed random maps of one seed: encoders, head and their scales."""

    def __init__(self, spec: SynthSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        z, h = spec.latent_dim, spec.hidden
        pos = self._positions()

        def layer(n_out, n_in, gain=1.0):
            return (gain / np.sqrt(n_in)) * rng.standard_normal((n_out, n_in))

        # inputs of each tanh layer are O(1): z and pos codes are unit scale, the gains keep tanh nonlinear
        self.c1, self.cp, self.c0 = layer(h, z, 1.5), layer(h, pos.shape[1], 1.5), 0.3 * rng.standard_normal(h)
        self.c2 = layer(spec.cond_dim, h)
        self.t1, self.tp, self.t0 = layer(h, z, 1.5), layer(h, pos.shape[1], 1.5), 0.3 * rng.standard_normal(h)
        self.g1, self.gp, self.g0 = layer(h, z, 1.5), layer(h, pos.shape[1], 1.5), 0.3 * rng.standard_normal(h)
        self.t2 = layer(spec.target_dim, h)
        self.k1, self.k0 = layer(h, z, 1.5), 0.3 * rng.standard_normal(h)
        self.k2 = layer(spec.target_dim, h)
        self.ln_weight = 1.0 + 0.1 * rng.standard_normal(spec.target_dim)
        self.ln_bias = 0.1 * rng.standard_normal(spec.target_dim)
        self.projection = layer(spec.text_dim, spec.target_dim)
        self.pos_c, self.pos_t = pos @ self.cp.T + self.c0, pos @ self.tp.T + self.t0
        self.pos_g = pos @ self.gp.T + self.g0
        calib = np.random.default_rng([spec.seed, 0, 1]).standard_normal((CALIBRATION, z))
        self.scale = {"cond": 1.0, "target": 1.0, "cls": 1.0}
        cond, target, _ = self._raw(calib[:16])
        self.scale = {"cond": 1 / _rms(cond), "target": 1 / _rms(target), "cls": 1 / _rms(self._cls(calib))}
        # CLIP-like outlier channels: a few channels of each stream scaled up and shifted, tens of times the rest
        out = np.random.default_rng([spec.seed, 0, 2])
        self.outliers = {}
        for name, dim in (("cond", spec.cond_dim), ("target", spec.target_dim)):
            idx = np.sort(out.choice(dim, size=spec.outlier_channels, replace=False))
            gain = spec.outlier_scale * out.uniform(0.5, 1.0, size=len(idx))
            self.outliers[name] = (idx, gain, gain * out.uniform(-1.0, 1.0, size=len(idx)))

    def _positions(self) -> np.ndarray:
        """[gh*gw, 16] sinusoidal code of (row, col) at 4 frequencies, row-major like the patch tokens."""
        gh, gw = self.spec.grid
        rows, cols = np.meshgrid(np.arange(gh) / max(gh, 1), np.arange(gw) / max(gw, 1), indexing="ij")
        freqs = np.pi * np.array([1.0, 2.0, 3.0, 5.0])
        feats = [f(x.reshape(-1, 1) * freqs) for x in (rows, cols) for f in (np.sin, np.cos)]
        return np.concatenate(feats, axis=1)

    def _cls(self, z: np.ndarray) -> np.ndarray:
        return np.tanh(z @ self.k1.T + self.k0) @ self.k2.T * self.scale["cls"]

    def _raw(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Noise-free (cond [n, S, Dc], target patches [n, S, Dt], target CLS [n, Dt])."""
        zc = (z @ self.c1.T)[:, None, :] + self.pos_c[None]
        zt = (z @ self.t1.T)[:, None, :] + self.pos_t[None]
        zg = (z @ self.g1.T)[:, None, :] + self.pos_g[None]
        cond = np.tanh(zc) @ self.c2.T * self.scale["cond"]
        target = (np.tanh(zt) * np.tanh(zg)) @ self.t2.T * self.scale["target"]
        return cond, target, self._cls(z)

    def _outlier(self, x: np.ndarray, stream: str) -> np.ndarray:
        idx, gain, shift = self.outliers[stream]
        x = x.copy()
        x[..., idx] = x[..., idx] * gain + shift
        return x

    def global_embedding(self, cls: np.ndarray) -> np.ndarray:
        """visual_projection(post_layernorm(cls)), as CLIP computes its image embedding (float64)."""
        mu = cls.mean(-1, keepdims=True)
        var = cls.var(-1, keepdims=True)
        return ((cls - mu) / np.sqrt(var + 1e-5) * self.ln_weight + self.ln_bias) @ self.projection.T

    def chunk(self, split: str, index: int, n: int) -> dict:
        """Samples [index*shard_size, +n) of a split; each chunk has its own seed, so any chunk is reproducible."""
        spec = self.spec
        rng = np.random.default_rng([spec.seed, 1 + spec.splits[split], index])
        z = rng.standard_normal((n, spec.latent_dim))
        cond, target, cls = self._raw(z)
        cond = cond + spec.noise * rng.standard_normal(cond.shape)
        target = target + spec.noise * rng.standard_normal(target.shape)
        cls = cls + spec.noise * rng.standard_normal(cls.shape)
        if spec.outlier_channels:
            cond, target = self._outlier(cond, "cond"), self._outlier(target, "target")
            cls = self._outlier(cls, "target")
        if spec.target_cls:
            target = np.concatenate([cls[:, None, :], target], axis=1)
        if spec.cond_cls:  # a CLS-like summary of the condition: the mean of its patches
            cond = np.concatenate([cond.mean(1, keepdims=True), cond], axis=1)
        image = _normalize(self.global_embedding(cls))
        k = rng.integers(spec.captions[0], spec.captions[1] + 1, size=n)
        text = [_normalize(image[i] + spec.caption_noise / np.sqrt(spec.text_dim)
                           * rng.standard_normal((k[i], spec.text_dim))) for i in range(n)]
        return {"cond": cond, "target": target, "cls": cls, "text": text}


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def recall_at_1(image: np.ndarray, texts: list[np.ndarray]) -> float:
    """Image->text Recall@1: a query is a hit when its nearest caption (cosine) is one of its own."""
    owner = np.concatenate([np.full(len(t), i) for i, t in enumerate(texts)])
    sims = _normalize(image) @ _normalize(np.concatenate(texts)).T
    return float(np.mean(owner[sims.argmax(1)] == np.arange(len(image))))


def write_synth(out: str | Path, spec: SynthSpec, overwrite: bool = False, progress: bool = True) -> dict:
    """Writes the train and eval splits, head.safetensors and manifest.json; returns a summary."""
    from tqdm import tqdm

    folder = prepare_output(out, overwrite)
    world = SynthWorld(spec)
    gh, gw = spec.grid
    cond_name, target_name = stream_names(spec.task)
    model = f"synthetic(seed={spec.seed})"
    cond = StreamSpec(cond_name, model, spec.cond_dim, gh * gw + int(spec.cond_cls), spec.cond_cls,
                      storage=spec.storage, scale=spec.int8_scale)
    target = StreamSpec(target_name, model, spec.target_dim, gh * gw + int(spec.target_cls), spec.target_cls,
                        storage=spec.storage_target, scale=spec.int8_scale)
    per = spec.captions[0] if spec.captions[0] == spec.captions[1] else None
    text = TextSpec(spec.text_dim, spec.captions[1], per, model)
    save_head(folder, world.ln_weight, world.ln_bias, world.projection, 1e-5)
    records, summary, stats = {}, {"splits": {}}, None
    counts = {"train": spec.train_samples, "eval": spec.eval_samples}
    bar = tqdm(total=sum(counts.values()), unit="sample", desc="data synth", disable=not progress)
    for split, total in counts.items():
        oracle_image, oracle_text = [], []
        with ShardSetWriter(folder, split, cond, target, text, shard_size=spec.shard_size) as writer:
            for index, start in enumerate(range(0, total, spec.shard_size)):
                n = min(spec.shard_size, total - start)
                chunk = world.chunk(split, index, n)
                for i in range(n):
                    key = f"{split}-{start + i:06d}"
                    writer.write(key, chunk["cond"][i], chunk["target"][i], chunk["text"][i],
                                 [f"synthetic sample {key}, caption {c}" for c in range(len(chunk["text"][i]))],
                                 {"generator": "blip3o-fast data synth", "seed": spec.seed})
                # as stored: the oracle an evaluator computes reads the float16 tokens
                cls = chunk["target"][:, 0] if spec.target_cls else chunk["cls"]
                oracle_image.append(world.global_embedding(cls.astype(np.float16).astype(np.float64)))
                oracle_text.extend(t.astype(np.float16).astype(np.float64) for t in chunk["text"])
                bar.update(n)
        records[split] = writer.records
        if split == "train" and total:  # the normalisation statistics come from the train split only
            stats = writer.channel_stats(split)
        if total:
            summary["splits"][split] = {"samples": writer.stats.samples, "shards": len(writer.records),
                                        "oracle_recall_at_1": recall_at_1(np.concatenate(oracle_image), oracle_text)}
    bar.close()
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items() if k != "splits"}
    save_manifest(folder, spec.task, spec.grid, cond, target, text, records,
                  created_by={"command": "blip3o-fast data synth", "args": args}, stats=stats)
    summary["chance_recall_at_1"] = 1.0 / max(spec.eval_samples, 1)
    return summary
