"""Run metrics: the window of steps between records (throughput, MFU, progress bar or plain lines),
metrics.jsonl, TensorBoard events, optional wandb (its run id kept in the run folder), the loss plot, and
the FLOP count behind MFU. Only rank 0 writes; the window reduces values across ranks before they are
written."""

from __future__ import annotations

import json
import math
import secrets
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..errors import UserError
from ..runtime import distributed
from ..runtime.files import atomic_write_text

# dense bf16 tensor-core peak (FLOP/s) by device name: the MFU denominator
PEAK_BF16_FLOPS = {
    "H100": 989.4e12,
    "H200": 989.4e12,
    "H800": 989.4e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def train_flops_per_sample(model) -> float:
    """Matmul FLOPs of one training sample (forward + backward = 3 x forward, 2 FLOPs per MAC).

    Per sample, with Nt target and Nc condition tokens, hidden H, depth L, MLP width F:
      in/out projections  2·Nt·Dt·H · 2          condition embedding  2·Nc·Dc·H (twice with cond_add)
      cross-attention K/V 2·Nc·H·2H·L            timestep MLP + AdaLN  2·(256H + H² + 9H²·L + 2H²)
      per block: self qkv 6·Nt·H², self scores + values 4·Nt²·H, projections 2·2·Nt·H²,
                 cross q 2·Nt·H², cross scores + values 4·Nt·Nc·H, MLP 6·Nt·H·F (SwiGLU) or 4·Nt·H·F
    Elementwise work (norms, RoPE, the loss) is not counted, as is usual for MFU.
    """
    cfg, task = model.config, model.task
    Nt, Nc, H, L = task.target_tokens, task.cond_tokens, cfg.hidden_size, cfg.depth
    F = model.blocks[0].mlp.w2.in_features
    mlp = (6 if cfg.mlp == "swiglu" else 4) * Nt * H * F
    block = 6 * Nt * H * H + 4 * Nt * Nt * H + 4 * Nt * H * H + 2 * Nt * H * H + 4 * Nt * Nc * H + mlp
    cond_in = (2 if cfg.cond_add else 1) * 2 * Nc * task.cond_dim * H  # cond_embed [+ cond_add]
    forward = (4 * Nt * task.target_dim * H + cond_in + 4 * Nc * H * H * L
               + 2 * (256 * H + H * H + 9 * H * H * L + 2 * H * H) + L * block)
    return 3.0 * forward


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(run_dir: Path) -> str:
    """The run folder's W&B run id, made on first use and kept in the folder: a resumed run (another
    process, another job) logs into the same W&B run."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # 8 lowercase hex characters, W&B's id alphabet and length
    atomic_write_text(path, run_id + "\n")
    return run_id


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, wandb: dict | None = None, config: dict | None = None,
                 resume_step: int = 0):
        """`wandb`: None, or the keyword arguments of wandb.init (project, entity, name, group, tags)."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if resume_step and self.path.exists():  # a resumed run rewrites the steps it repeats
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step or None)
        if wandb is not None:
            try:
                import wandb as wandb_module
            except ImportError:
                raise UserError("train.wandb=true but wandb is not installed: pip install wandb, or set "
                                "train.wandb=false") from None
            settings = {k: v for k, v in wandb.items() if v not in (None, [], ())}
            self.wandb = wandb_module.init(**settings, config=config, dir=str(run_dir), id=wandb_run_id(run_dir),
                                           resume="allow")

    def log(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"{kind}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path, kind: str = "train") -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind", "train") == kind]


def plot_loss(run_dir: Path) -> Path | None:
    """loss.png: training loss (and velocity cosine) per step from metrics.jsonl, eval points if any."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="flow-matching loss", color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if "velocity_cos" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["velocity_cos"] for r in rows], label="velocity cosine", color="tab:orange", alpha=0.7)
        evals = read_metrics(Path(run_dir) / "metrics.jsonl", kind="eval")
        if evals and "patch_cosine" in evals[0]:
            ax2.plot([r["step"] for r in evals], [r["patch_cosine"] for r in evals], "o-", color="tab:green",
                     label="held-out patch cosine (sampled)")
        ax2.set_ylabel("cosine")
        ax2.set_ylim(-0.05, 1.05)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plain_line(step: int, steps: int, values: dict) -> str:
    """One record as a line for a log file (no terminal: tqdm's bar is off there)."""
    parts = [f"step {step}/{steps}", f"loss {values['loss']:.4f}", f"lr {values['lr']:.3g}",
             f"samples/s {values['samples_per_s']:.1f}"]
    if "mfu" in values:
        parts.append(f"mfu {100 * values['mfu']:.1f}%")
    parts.append(f"data wait {100 * values['data_wait_frac']:.0f}%")
    if "gpu_mem_gib" in values:
        parts.append(f"gpu mem {values['gpu_mem_gib']:.1f} GiB")
    return "  ".join(parts)


class MetricsWindow:
    """The steps since the last record: every `log_every` steps (and at the last step) their mean over
    steps and ranks, throughput, MFU and data-wait share go to the log, and on rank 0 to the progress bar
    or, when stdout is not a terminal (a batch job), as one plain line (`plain_line`).
    A collective at each record: every rank calls `after_step` every step."""

    def __init__(self, logger: MetricsLogger, dist, cfg, flops_per_sample: float, start_step: int):
        self.logger, self.dist, self.cfg = logger, dist, cfg
        self.flops_per_sample = flops_per_sample
        self.peak = peak_flops(dist.device)
        self.samples_per_step = cfg.data.batch_size * cfg.train.grad_accum * dist.world_size
        self.records: list[dict] = []
        self.started = time.perf_counter()
        self.bar = None
        if dist.is_main:
            self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            disable=None)

    def after_step(self, step: int, record: dict, extra: dict) -> None:
        """Adds one step's record; `extra` (counters, data stats) is logged as is at a record."""
        self.records.append(record)
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps:
            self._flush(step, extra)

    def _flush(self, step: int, extra: dict) -> None:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        window = self.records
        keys = set().union(*window)
        local = {k: sum(r[k] for r in window if k in r) / sum(1 for r in window if k in r) for k in keys}
        local.pop("skipped", None)
        local.pop("fault", None)
        values = distributed.mean_across(local, self.dist.device)
        values["samples_per_s"] = self.samples_per_step * len(window) / seconds
        values["tokens_per_s"] = values["samples_per_s"] * self.cfg.task.target_tokens
        values["data_wait_frac"] = values.pop("data_wait_s") * len(window) / seconds
        if self.peak is not None:
            values["mfu"] = values["samples_per_s"] * self.flops_per_sample / (self.peak * self.dist.world_size)
        if self.dist.device.type == "cuda":  # this rank's peak since the last record
            values["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.dist.device)
        values.update(extra)
        self.logger.log(step, values)
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", vcos=f"{values['velocity_cos']:.3f}",
                                 samples_s=f"{values['samples_per_s']:.0f}")
        elif self.dist.is_main:  # no terminal: tqdm turned itself off, a log file gets plain lines
            print(plain_line(step, self.cfg.train.steps, values), flush=True)
        self.records, self.started = [], time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
