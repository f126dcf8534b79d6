"""The training engine (docs/architecture.md §2, §3.10): DeepSpeed ZeRO 0-3 for every run, one process or many.

    train(cfg, run_dir, resume) -> exit code: Trainer(cfg, run_dir, resume).fit() under the run folder's lock

The Trainer is a table of contents over its components, each owning its cadence:
  data          a resumable train stream (data.TrainLoader)
  model_engine  the DiT in a DeepSpeed engine with AdamW, and the non-finite step skip (model_engine.py)
  ema           float32 moving average of the weights (ema.py)
  metrics       the window of steps between records: throughput, MFU, logs (metrics.py)
  evaluator     held-out evaluation every train.eval_every steps (evaluator.py)
  checkpointer  complete-only checkpoints every train.ckpt_every steps (runtime/checkpoint.py)

Every step is a pure function of (weights, optimizer state, step, data position, seed): the flow-matching
noise, timesteps and condition drops come from generators seeded by (seed, step, rank, micro-batch) and
the learning rate is a function of the step, so a resumed run repeats the uninterrupted run's losses exactly.

Faults: a non-finite loss or gradient on any rank skips the optimizer step on every rank and is counted;
`train.max_nonfinite` in a row stops the run with a checkpoint (exit 3). SIGTERM/SIGINT save a checkpoint at
the next step boundary and exit 75 (resumable; runtime/exit_codes.py). One job per run folder: a second one
is refused (exit 2) while the lock is held.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch

from .. import data
from ..config import RunConfig
from ..data.quant import to_device
from ..errors import UserError
from ..model import DiT
from ..model.flow import training_loss
from ..model.head import GlobalHead
from ..model.normalize import FlowNorm, needs_stats
from ..ops import check_device
from ..runtime import distributed, exit_codes
from ..runtime.checkpoint import Checkpointer, check_same_experiment, partitioned, rank_files
from ..runtime.run_lock import hold_run_lock
from .ds_config import deepspeed_config
from .ema import EMA
from .evaluator import Evaluator
from .init_from import load_init_weights
from .metrics import MetricsLogger, MetricsWindow, plot_loss, train_flops_per_sample
from .model_engine import COMPUTE_DTYPE, ModelEngine, resolve_precision
from .optim import lr_at
from .preflight import check_disk_space, check_eval_split
from .profile import StepProfiler
from .signals import StopRequest

log = logging.getLogger("blip3o_fast.train")

FAULT_NAN_ENV = "BLIP3O_FAST_FAULT_NAN_STEPS"  # test hook: comma-separated steps whose rank-0 loss is NaN
KEYS_ENV = "BLIP3O_FAST_RECORD_KEYS"  # test hook: a folder; each rank appends `step key` of every sample it trains on


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: str | None = "auto"):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = distributed.init()
        self.is_main = self.dist.is_main
        self.device = self.dist.device
        self.precision = resolve_precision(cfg.train.precision, self.device)
        deepspeed_config(cfg, self.precision, self.dist.world_size)  # a bad DeepSpeed JSON fails now, before the build
        self.dtype = COMPUTE_DTYPE[self.precision]

        # the run folder's checkpoint first: --resume auto into another experiment's folder is refused at once
        self.checkpointer = Checkpointer(self.run_dir, cfg.train.keep_last, self.dist)
        checkpoint = self.checkpointer.resolve(resume)
        if resume == "auto" and checkpoint is not None:
            check_same_experiment(checkpoint, cfg.to_dict())
        # data next: a bad dataset fails before anything heavy is built
        self.dataset = data.open_dataset(cfg.data.path)
        # int8 streams cross to a GPU as int8 (half the bytes) and are dequantised there; on a CPU the reader does it
        self.dataset.dequantize = "device" if self.device.type == "cuda" else "reader"
        data.check_compatible(self.dataset, cfg.task)
        if cfg.train.eval_every > 0:  # fail now, not at the first evaluation hours in
            check_eval_split(cfg, self.dataset)
        self.loader = data.TrainLoader(
            self.dataset, cfg.data.train_split, cfg.data.batch_size, cfg.train.seed, self.dist.rank,
            self.dist.world_size, cfg.data.num_workers, cfg.data.shuffle_buffer,
            pin_memory=cfg.data.pin_memory and self.device.type == "cuda")
        self.head = self._contrastive_head() if cfg.flow.contrastive_weight > 0 else None
        stats = (data.read_stats(self.dataset.path, self.dataset.cond_dim, self.dataset.target_dim)
                 if needs_stats(cfg.flow) else None)
        self.norm = FlowNorm(cfg.flow, stats.tensors() if stats else None).to(self.device)  # §3.1.1

        if cfg.model.fused_ops:
            check_device(self.device)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = DiT(cfg.model, cfg.task)
        if cfg.train.init_from and checkpoint is None:  # fine-tune: weights only; a run's own checkpoint wins
            source = load_init_weights(model, cfg.train.init_from)
            if self.is_main:
                print(f"initialized from {source} (weights only: new optimizer, step 0)", flush=True)
        self.flops_per_sample = train_flops_per_sample(model)
        check_disk_space(self.run_dir, sum(p.numel() for p in model.parameters()))
        if self.is_main:
            print(model.describe(), flush=True)
        if cfg.train.compile:
            model.compile(dynamic=False)  # in place: parameter names, checkpoints and EMA are unchanged
        # another process count than a ZeRO 1-3 checkpoint was saved with: DeepSpeed's universal form re-shards it
        self.universal = None
        if checkpoint is not None and len(rank_files(checkpoint)) != self.dist.world_size and partitioned(checkpoint):
            self.universal = self.checkpointer.universal(checkpoint)
        self.model_engine = ModelEngine(model, cfg, self.device, self.precision, load_universal=bool(self.universal))
        self.ema = EMA(self.model_engine.module, cfg.train.ema_decay)
        self.evaluator = Evaluator(cfg, self.dataset, self.dist, self.run_dir)

        self.step = 0
        self.counters = {"nonfinite_steps": 0, "nonfinite_in_a_row": 0, "samples": 0}
        self._restore(checkpoint)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        distributed.barrier()
        wandb = (dict(project=cfg.train.wandb_project, entity=cfg.train.wandb_entity,
                      name=cfg.train.wandb_name or self.run_dir.name, group=cfg.train.wandb_group,
                      tags=list(cfg.train.wandb_tags)) if cfg.train.wandb else None)
        self.logger = MetricsLogger(self.run_dir, self.is_main, wandb, cfg.to_dict(), resume_step=self.step)
        self.profiler = StepProfiler(cfg.train.profile, cfg.train.profile_steps, self.run_dir, self.dist.rank,
                                     self.device)
        self.fault_steps = {int(s) for s in os.environ.get(FAULT_NAN_ENV, "").split(",") if s.strip()}
        keys_dir = os.environ.get(KEYS_ENV)
        self.keys_file = Path(keys_dir) / f"keys-rank{self.dist.rank}.txt" if keys_dir else None

    def _contrastive_head(self) -> GlobalHead:
        weights = data.read_head(self.dataset.path, self.cfg.task.target_dim)
        if weights is None:
            raise UserError(f"flow.contrastive_weight > 0 needs the target head {self.dataset.path / data.HEAD_FILE}: "
                            f"set flow.contrastive_weight=0 or use a dataset with head.safetensors")
        return GlobalHead.from_weights(weights.tensors, weights.layer_norm_eps).to(self.device)

    def _restore(self, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        restored = self.checkpointer.load(self.model_engine.engine, checkpoint, self.universal)
        self.step = restored.step
        self.counters.update(restored.meta.get("counters", {}))
        self.ema.load_full_state_dict(restored.ema)
        own = restored.rank_state["data"] if restored.rank_state else None
        if own is not None and self.loader.same_layout(own):
            self.loader.load_state_dict(own)
            if self.is_main:
                print(f"resumed from {checkpoint} at step {self.step}", flush=True)
            return
        # another process count or data.num_workers: the data streams are re-dealt (data/elastic.py)
        states = self.checkpointer.data_states(checkpoint)
        line = self.loader.load_elastic(states)
        if self.is_main:
            how = (f"re-sharded from DeepSpeed's universal checkpoint {self.universal}" if self.universal else
                   "loaded whole (not split per process)")
            print(f"resumed from {checkpoint} at step {self.step}; elastic resume: {restored.saved_ranks} -> "
                  f"{self.dist.world_size} ranks, {states[0]['streams']} -> {self.loader.streams} data stream(s) "
                  f"per rank; weights and optimizer state {how}; EMA loaded; data: {line}", flush=True)

    # -- one step ---------------------------------------------------------------------------------

    def train_step(self, batches) -> dict:
        """Forward/backward over grad_accum micro-batches and one optimizer step (or a counted skip)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.train)
        self.model_engine.set_lr(lr)
        sums: dict[str, list[torch.Tensor]] = {}
        data_wait = 0.0
        nonfinite_loss = False
        for micro in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            if self.keys_file is not None:
                with open(self.keys_file, "a") as f:
                    f.writelines(f"{self.step + 1} {key}\n" for key in batch["key"])
            target, cond = self._inputs(batch)
            data_wait += time.perf_counter() - t0
            g = distributed.generator(self.device, cfg.train.seed, self.step, self.dist.rank, micro)
            loss, metrics = training_loss(self.model_engine.engine, target, cond, cfg.flow, g, head=self.head,
                                          denormalize=self.norm.target.inverse)
            if self.step in self.fault_steps and self.is_main:
                loss = loss * float("nan")
            # a non-finite loss still backpropagates: its NaN gradients make every rank skip the step
            nonfinite_loss |= not bool(torch.isfinite(loss.detach()))
            self.model_engine.backward(loss)
            for key, value in {"loss": loss.detach(), **metrics}.items():
                sums.setdefault(key, []).append(value.float())
            if micro < cfg.train.grad_accum - 1:
                self.model_engine.micro_step()
        grad_norm, skipped = self.model_engine.step()
        skipped = distributed.any_true(skipped or nonfinite_loss, self.device)
        if not skipped:
            self.ema.update(self.step)
        record = {key: torch.stack(values).mean().item() for key, values in sums.items()}
        # under fp16 a skipped step with a finite loss is a loss-scale overflow: expected, not a fault (§4.1)
        fault = distributed.any_true(nonfinite_loss, self.device) if self.precision == "fp16" else skipped
        record.update(lr=lr, data_wait_s=data_wait, skipped=float(skipped), fault=float(fault))
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record

    def _inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on the device, normalised (§3.1.1): the target in float32 or float16, the cond in the compute
        dtype. Normalised in float32: a cast back to float16 would round the normalised values again."""
        target = to_device(batch, "target", self.device, non_blocking=True)
        cond = to_device(batch, "cond", self.device, non_blocking=True)
        if self.norm.active:
            target, cond = self.norm.target(target.float()), self.norm.cond(cond.float())
        return target, cond.to(self.dtype)

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> int:
        cfg = self.cfg
        self.model_engine.train()
        batches = iter(self.loader)
        metrics = MetricsWindow(self.logger, self.dist, cfg, self.flops_per_sample, self.step)
        samples_per_step = metrics.samples_per_step
        exit_code = exit_codes.OK
        try:
            with StopRequest() as stop:
                while self.step < cfg.train.steps:
                    self.profiler.before_step(self.step)
                    record = self.train_step(batches)
                    self.step += 1
                    self.profiler.after_step(self.step)
                    self._count(record, samples_per_step)
                    metrics.after_step(self.step, record, self._log_extra())
                    if self.counters["nonfinite_in_a_row"] >= cfg.train.max_nonfinite:
                        self._save("non-finite")
                        self._say_nonfinite_stop()
                        exit_code = exit_codes.NONFINITE
                        break
                    if distributed.any_true(stop.requested, self.device):
                        self._save("signal")
                        if self.is_main:
                            print(f"stopped by signal at step {self.step}; checkpoint saved, resume with --resume auto "
                                  f"(exit {exit_codes.STOPPED})", flush=True)
                        exit_code = exit_codes.STOPPED
                        break
                    if self.step % cfg.train.ckpt_every == 0 or self.step == cfg.train.steps:
                        self._save("periodic" if self.step < cfg.train.steps else "final")
                    if self.evaluator.due(self.step):
                        self.logger.log(self.step, self.evaluator.run(self.ema.full_state_dict(), self.step),
                                        kind="eval")
                        self.model_engine.train()
        finally:
            self.profiler.close()
            metrics.close()
            self.logger.close()
        if self.is_main:
            self._say_done()
        return exit_code

    def _count(self, record: dict, samples_per_step: int) -> None:
        self.counters["samples"] += samples_per_step
        if record["skipped"]:
            self.counters["nonfinite_steps"] += 1
        if record["fault"]:
            self.counters["nonfinite_in_a_row"] += 1
        else:
            self.counters["nonfinite_in_a_row"] = 0

    def _log_extra(self) -> dict:
        return {"nonfinite_steps": self.counters["nonfinite_steps"],
                "skipped_samples": self.loader.stats().get("skipped_samples", 0)}

    def _save(self, reason: str) -> None:
        meta = {"counters": self.counters, "reason": reason, "data_stats": self.loader.stats()}
        path = self.checkpointer.save(self.model_engine.engine, self.step, self.ema, {"data": self.loader.state_dict()},
                                      meta, self.cfg.to_yaml())
        if self.is_main:
            log.info("checkpoint %s (%s)", path, reason)

    def _say_nonfinite_stop(self) -> None:
        if self.is_main:
            print(f"stopping: {self.counters['nonfinite_in_a_row']} steps in a row had a non-finite loss or gradient "
                  f"(train.max_nonfinite={self.cfg.train.max_nonfinite}); the last good weights are in the checkpoint "
                  f"of step {self.step}. Lower train.lr or check the data.", file=sys.stderr, flush=True)

    def _say_done(self) -> None:
        stats = self.loader.stats()
        skipped = {k: v for k, v in stats.items() if k.startswith("skipped") and v}
        print(f"done at step {self.step}: {self.counters['nonfinite_steps']} non-finite step(s) skipped; data "
              f"{'skipped ' + str(skipped) if skipped else 'all samples valid'}", flush=True)
        plot_loss(self.run_dir)


def train(cfg: RunConfig, run_dir: str | Path | None = None, resume: str | None = "auto") -> int:
    run_dir = Path(run_dir or cfg.train.out_dir)
    # the lock comes before anything is written into the folder (config.yaml, metrics, checkpoints)
    dist = distributed.init()
    with hold_run_lock(run_dir, "train", dist) as lock:
        if lock is not None:
            print(f"run folder lock: {lock.describe()}", flush=True)
        try:
            return Trainer(cfg, run_dir, resume).fit()
        except Exception as e:
            if dist.world_size == 1 or not distributed.is_peer_failure(e):
                raise
            # another rank died (or hangs past the collective timeout): no collective can complete any more
            print(f"blip3o-fast train: rank {dist.rank}: another rank died or stopped answering "
                  f"({str(e).splitlines()[0][:200]}); rerun the same command to resume from the newest complete "
                  f"checkpoint (exit {exit_codes.RANK_LOST})", file=sys.stderr, flush=True)
            return exit_codes.RANK_LOST
