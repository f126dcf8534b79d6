"""The training engine (DESIGN §7): DeepSpeed ZeRO 0-3 for every run, one process or many.

    Trainer(cfg, run_dir, resume).fit() -> exit code

Named components: data (a resumable train stream), model (the DiT inside a DeepSpeed engine with a
torch AdamW), ema, checkpointer, metrics. Every step is a pure function of (weights, optimizer
state, step, data position, seed): the flow-matching noise, timesteps and condition drops come from
generators seeded by (seed, step, rank, micro-batch) and the learning rate is a function of the
step, so a resumed run repeats the uninterrupted run's losses exactly.

Faults: a non-finite loss or gradient on any rank skips the optimizer step on every rank (ZeRO >= 1 and
bf16: DeepSpeed's overflow check; stage 0 fp32: ours) and is counted; `train.max_nonfinite` in a row stops the
run with a checkpoint. SIGTERM/SIGINT save a checkpoint at the next step boundary and exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from ..runtime import distributed
from ..runtime.checkpoint import Checkpointer
from ..config import RunConfig
from .ema import EMA
from ..errors import UserError
from .metrics import MetricsLogger, peak_flops, plot_loss, train_flops_per_sample

log = logging.getLogger("blip3o_fast.train")

EXIT_OK, EXIT_NONFINITE = 0, 3
FAULT_NAN_ENV = "BLIP3O_FAST_FAULT_NAN_STEPS"  # test hook: comma-separated steps whose rank-0 loss is NaN


def lr_at(step: int, cfg) -> float:
    """Linear warmup to train.lr over warmup_steps, then cosine decay to train.min_lr at train.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def deepspeed_config(cfg: RunConfig, precision: str) -> dict:
    zero = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage == 3:
        # gather parameters per use and keep no persistent full copies: ZeRO-3's point
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=int(1e9))
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (nanoGPT): not on biases, norm gains or 1-D parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW, with its fused kernel (one pass over each parameter's state) where this torch has one
    for the device (CUDA; CPU since 2.4), else the multi-tensor one."""
    groups = optimizer_groups(model, cfg.weight_decay)
    try:
        model.to(device)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@contextlib.contextmanager
def skipped_optimizer_step(optimizer):
    """Lets DeepSpeed run its step bookkeeping (counters, zero_grad) while the optimizer's own step is
    a no-op: how a stage-0 step with non-finite gradients is skipped without touching weights or moments."""
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.signum = None
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: str | None = "auto"):
        import deepspeed

        from .. import data
        from ..model.flow import GlobalHead
        from ..model import DiT

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = distributed.init()
        self.is_main = self.dist.is_main
        self.device = self.dist.device
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32

        # data: fail on a bad dataset before building anything heavy
        self.dataset = data.open_dataset(cfg.data.path)
        data.check_compatible(self.dataset, cfg.task)
        self.loader = data.train_loader(
            self.dataset, cfg.data.train_split, cfg.data.batch_size, cfg.train.seed, self.dist.rank,
            self.dist.world_size, cfg.data.num_workers, cfg.data.shuffle_buffer,
            pin_memory=cfg.data.pin_memory and self.device.type == "cuda")
        self.head = None
        if cfg.flow.contrastive_weight > 0:
            head_path = Path(self.dataset.path) / "head.safetensors"
            if not head_path.is_file():
                raise UserError(f"flow.contrastive_weight > 0 needs the target head {head_path}: set "
                                f"flow.contrastive_weight=0 or use a dataset with head.safetensors")
            self.head = GlobalHead.from_file(head_path).to(self.device).requires_grad_(False)

        # model in a DeepSpeed engine with a torch AdamW (fused kernels on CUDA)
        if cfg.model.fused_ops:
            from ..ops import check_device

            check_device(self.device)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = DiT(cfg.model, cfg.task)
        self.flops_per_sample = train_flops_per_sample(model)
        if self.is_main:
            print(model.describe(), flush=True)
        if cfg.train.compile:
            model.compile(dynamic=False)  # in place: parameter names, checkpoints and EMA are unchanged
        optimizer = make_adamw(model, cfg.train, self.device)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(cfg, self.precision))
        self.ema = EMA(self.engine.module, cfg.train.ema_decay)
        self.checkpointer = Checkpointer(self.run_dir, cfg.train.keep_last, self.dist)

        self.step = 0
        self.counters = {"nonfinite_steps": 0, "nonfinite_in_a_row": 0, "samples": 0}
        checkpoint = self.checkpointer.resolve(resume)
        if checkpoint is not None:
            restored = self.checkpointer.load(self.engine, checkpoint)
            self.step = restored.step
            self.counters.update(restored.meta.get("counters", {}))
            self.ema.load_full_state_dict(restored.ema)
            self.loader.load_state_dict(restored.rank_state["data"])
            if self.is_main:
                print(f"resumed from {checkpoint} at step {self.step}", flush=True)

        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        distributed.barrier()
        self.metrics = MetricsLogger(self.run_dir, self.is_main, cfg.train.wandb_project if cfg.train.wandb else None,
                                     cfg.to_dict(), resume_step=self.step)
        self.peak = peak_flops(self.device)
        self.fault_steps = {int(s) for s in os.environ.get(FAULT_NAN_ENV, "").split(",") if s.strip()}

    # -- one step ---------------------------------------------------------------------------------

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _local_grad_norm(self) -> float:
        """The (already all-reduced, stage 0) gradient norm, before DeepSpeed clips it."""
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0

    def train_step(self, batches) -> dict:
        """Forward/backward over grad_accum micro-batches and one optimizer step (or a counted skip)."""
        from ..model.flow import training_loss

        cfg = self.cfg
        lr = lr_at(self.step, cfg.train)
        self._set_lr(lr)
        losses, mses, coss, contrastive = [], [], [], []
        data_wait = 0.0
        nonfinite_loss = False
        for micro in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            target = batch["target"].to(self.device, non_blocking=True)
            cond = batch["cond"].to(self.device, self.dtype, non_blocking=True)
            data_wait += time.perf_counter() - t0
            g = distributed.generator(self.device, cfg.train.seed, self.step, self.dist.rank, micro)
            loss, m = training_loss(self.engine, target, cond, cfg.flow, g, head=self.head)
            if self.step in self.fault_steps and self.is_main:
                loss = loss * float("nan")
            # a non-finite loss still backpropagates: its NaN gradients make every rank skip the step
            nonfinite_loss |= not bool(torch.isfinite(loss.detach()))
            self.engine.backward(loss)
            losses.append(loss.detach().float())
            mses.append(m["mse"].float())
            coss.append(m["velocity_cos"].float())
            if "contrastive" in m:
                contrastive.append(m["contrastive"].float())
            if micro < cfg.train.grad_accum - 1:
                self.engine.step()  # DeepSpeed's micro-step bookkeeping; no update before the boundary
        grad_norm = None
        # DeepSpeed's ZeRO and bf16 optimizers skip a step with non-finite gradients themselves and report an
        # inf norm; a plain torch optimizer (stage 0, fp32) is passed through unchecked, so we check
        if isinstance(self.engine.optimizer, torch.optim.Optimizer):
            grad_norm = self._local_grad_norm()
            skip = not math.isfinite(grad_norm)
            if skip:
                with skipped_optimizer_step(self.engine.optimizer):
                    self.engine.step()
            else:
                self.engine.step()
        else:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
            skip = grad_norm is not None and not math.isfinite(grad_norm)
        skip = distributed.any_true(skip or nonfinite_loss, self.device)
        if not skip:
            self.ema.update(self.step)
        loss_value = torch.stack(losses).mean().item()
        out = {"loss": loss_value, "mse": torch.stack(mses).mean().item(), "velocity_cos": torch.stack(coss).mean().item(),
               "lr": lr, "data_wait_s": data_wait, "skipped": float(skip)}
        if contrastive:
            out["contrastive"] = torch.stack(contrastive).mean().item()
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        return out

    # -- the loop ---------------------------------------------------------------------------------

    def _save(self, reason: str) -> None:
        meta = {"counters": self.counters, "reason": reason, "data_stats": self.loader.stats()}
        path = self.checkpointer.save(self.engine, self.step, self.ema, {"data": self.loader.state_dict()}, meta,
                                      self.cfg.to_yaml())
        if self.is_main:
            log.info("checkpoint %s (%s)", path, reason)

    def _progress(self):
        if not self.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                    disable=None)

    def fit(self) -> int:
        cfg = self.cfg
        self.engine.train()
        stop = StopRequest()
        bar = self._progress()
        batches = iter(self.loader)
        window: list[dict] = []
        window_start = time.perf_counter()
        samples_per_step = cfg.data.batch_size * cfg.train.grad_accum * self.dist.world_size
        exit_code = EXIT_OK
        try:
            while self.step < cfg.train.steps:
                record = self.train_step(batches)
                self.step += 1
                self.counters["samples"] += samples_per_step
                if record["skipped"]:
                    self.counters["nonfinite_steps"] += 1
                    self.counters["nonfinite_in_a_row"] += 1
                else:
                    self.counters["nonfinite_in_a_row"] = 0
                window.append(record)
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    self._log(window, time.perf_counter() - window_start, samples_per_step, bar)
                    window, window_start = [], time.perf_counter()
                if self.counters["nonfinite_in_a_row"] >= cfg.train.max_nonfinite:
                    self._save("non-finite")
                    if self.is_main:
                        print(f"stopping: {self.counters['nonfinite_in_a_row']} steps in a row had a non-finite loss "
                              f"or gradient (train.max_nonfinite={cfg.train.max_nonfinite}); the last good weights are "
                              f"in the checkpoint of step {self.step}. Lower train.lr or check the data.",
                              file=sys.stderr, flush=True)
                    exit_code = EXIT_NONFINITE
                    break
                if distributed.any_true(stop.signum is not None, self.device):
                    self._save("signal")
                    if self.is_main:
                        print(f"stopped by signal at step {self.step}; checkpoint saved, resume with --resume auto",
                              flush=True)
                    break
                if self.step % cfg.train.ckpt_every == 0 or self.step == cfg.train.steps:
                    self._save("periodic" if self.step < cfg.train.steps else "final")
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    self._evaluate()
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
            self.metrics.close()
        if self.is_main:
            stats = self.loader.stats()
            skipped = {k: v for k, v in stats.items() if k.startswith("skipped") and v}
            print(f"done at step {self.step}: {self.counters['nonfinite_steps']} non-finite step(s) skipped; data "
                  f"{'skipped ' + str(skipped) if skipped else 'all samples valid'}", flush=True)
            plot_loss(self.run_dir)
        return exit_code

    def _log(self, window: list[dict], seconds: float, samples_per_step: int, bar) -> None:
        keys = set().union(*window)
        local = {k: sum(r[k] for r in window if k in r) / sum(1 for r in window if k in r) for k in keys}
        local.pop("skipped", None)
        values = distributed.mean_across(local, self.device)
        steps = len(window)
        values["samples_per_s"] = samples_per_step * steps / max(seconds, 1e-9)
        values["tokens_per_s"] = values["samples_per_s"] * self.cfg.task.target_tokens
        values["data_wait_frac"] = values.pop("data_wait_s") * steps / max(seconds, 1e-9)
        if self.peak is not None:
            values["mfu"] = values["samples_per_s"] * self.flops_per_sample / (self.peak * self.dist.world_size)
        values["nonfinite_steps"] = self.counters["nonfinite_steps"]
        data = self.loader.stats()
        values["skipped_samples"] = data.get("skipped_samples", 0)
        self.metrics.log(self.step, values)
        if bar is not None:
            bar.set_postfix(loss=f"{values['loss']:.4f}", vcos=f"{values['velocity_cos']:.3f}",
                            samples_s=f"{values['samples_per_s']:.0f}")

    def _evaluate(self) -> None:
        from ..evaluation.evaluate import evaluate_in_training

        report = evaluate_in_training(self)
        if report is not None:
            self.metrics.log(self.step, report, kind="eval")
        self.engine.train()


def train(cfg: RunConfig, run_dir: str | Path | None = None, resume: str | None = "auto") -> int:
    trainer = Trainer(cfg, run_dir or cfg.train.out_dir, resume)
    return trainer.fit()
