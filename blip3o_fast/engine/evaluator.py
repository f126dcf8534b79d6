"""The held-out evaluation during training: every `train.eval_every` steps, the EMA weights sample
`train.eval_samples` samples of the eval split; the report is saved under <run>/eval and its model
metrics are returned for the metrics log (kind=eval)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import RunConfig
from ..data import Dataset
from ..evaluation import build_eval_model, evaluate, save_report
from ..evaluation.evaluate import flat_metrics
from ..runtime.distributed import Dist


class Evaluator:
    def __init__(self, cfg: RunConfig, dataset: Dataset, dist: Dist, run_dir: Path):
        self.cfg, self.dataset, self.dist, self.run_dir = cfg, dataset, dist, run_dir

    def due(self, step: int) -> bool:
        return bool(self.cfg.train.eval_every) and step % self.cfg.train.eval_every == 0

    def run(self, weights: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """Evaluates these (full, float32) weights at `step`; every rank calls it."""
        model = build_eval_model(self.cfg, weights, self.dist.device)
        report = evaluate(model, self.dataset, self.cfg, self.dist, max_samples=self.cfg.train.eval_samples,
                          seed=self.cfg.train.seed, progress=False)
        report["step"] = step
        if self.dist.is_main:
            save_report(report, self.run_dir / "eval", f"step-{step:07d}")
        return flat_metrics(report)
