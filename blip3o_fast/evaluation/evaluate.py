"""Sampling-based evaluation (docs/architecture.md §3.12), each metric beside its baselines.

Generate the target tokens of held-out samples from noise with the EMA weights (Euler or Heun,
t: 0 -> 1), then report:
  patch_cosine   cos(pred, true) per patch token (CLS excluded), mean over tokens then images
  cls_cosine     the same for the CLS token, when the target carries one
  global_cosine  cos of the global embeddings (flow.head through head.safetensors; mean-pooled
                 patch tokens when the dataset has no head)
  recall@K       image->text retrieval against every caption of the evaluated images: a query is a
                 hit if any of its captions ranks in the top K (ties with other images' captions
                 count against it)
beside: oracle (the true target tokens through the same head), dataset_mean (every prediction is
the mean target of the evaluated samples) and chance (isotropic Gaussian tokens, i.e. the sampler's
starting noise, for the cosines; the exact random-ranking probability for recall).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..data import Dataset, EvalLoader, read_head, read_stats
from ..data.quant import to_device
from ..errors import UserError
from ..model import DiT
from ..model.flow import sample
from ..model.head import GlobalHead, global_embedding
from ..model.normalize import FlowNorm, needs_stats
from ..runtime import distributed

RECALL_KS = (1, 5, 10)
BASELINES = ("model", "oracle", "dataset_mean", "chance")


# -- retrieval ------------------------------------------------------------------------------------


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks=RECALL_KS, chunk: int = 1024) -> dict[int, float]:
    """Image->text Recall@K from scores [N_img, N_cap] and a boolean positives mask of the same shape.

    rank(i) = the number of *negative* captions scoring >= image i's best positive caption; a hit
    at K is rank < K (pessimistic about ties with negatives; an image's own captions never block it).
    """
    if scores.shape != positives.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ in shape")
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every image needs at least one positive caption")
    hits = {k: 0 for k in ks}
    for start in range(0, scores.shape[0], chunk):
        s, p = scores[start:start + chunk], positives[start:start + chunk]
        best = s.masked_fill(~p, float("-inf")).max(dim=1).values
        rank = ((s >= best[:, None]) & ~p).sum(dim=1)
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: hits[k] / scores.shape[0] for k in ks}


def chance_recall(captions_per_image: torch.Tensor, total_captions: int, ks=RECALL_KS) -> dict[int, float]:
    """Expected Recall@K of a uniformly random caption ranking: 1 - C(N - c, K) / C(N, K), averaged."""
    out = {}
    for k in ks:
        k_eff = min(k, total_captions)
        total = math.comb(total_captions, k_eff)
        miss = [math.comb(total_captions - int(c), k_eff) / total for c in captions_per_image]
        out[k] = 1.0 - sum(miss) / len(miss)
    return out


def rank_budget(max_samples: int, dist_info: distributed.Dist) -> int | None:
    """This rank's share of `max_samples` (None: no limit); the shares add up to max_samples exactly."""
    if not max_samples:
        return None
    return max_samples // dist_info.world_size + (dist_info.rank < max_samples % dist_info.world_size)


# -- per-rank accumulation ------------------------------------------------------------------------


def _token_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over tokens of cos(a[b, s], b[b, s]); [B]."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean(dim=-1)


class _Collected:
    """What each rank keeps of its samples: per-sample cosines, global embeddings, captions."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, **tensors: torch.Tensor) -> None:
        for key, value in tensors.items():
            self.parts.setdefault(key, []).append(value.detach().float().cpu())

    def gathered(self) -> dict[str, torch.Tensor]:
        local = {k: torch.cat(v) for k, v in self.parts.items()}
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return local
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
        keys = set().union(*(e.keys() for e in everyone))
        return {k: torch.cat([e[k] for e in everyone if k in e]) for k in keys}


# -- the evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, dataset: Dataset, cfg, dist_info: distributed.Dist, split: str | None = None, max_samples: int = 0,
             steps: int | None = None, sampler: str | None = None, guidance_scale: float | None = None,
             seed: int = 0, progress: bool = True, norm: FlowNorm | None = None) -> dict:
    """Samples the split's targets with `model` and returns the report (the same on every rank). `norm`: the
    model's normalisation (§3.1.1); default: cfg.flow's modes with the dataset's statistics."""
    if not dataset.has_targets:
        raise UserError(f"{dataset.path} holds conditions only (no targets to compare with): evaluate on a dataset "
                        f"with targets")
    split = split or cfg.data.eval_split
    steps = steps or cfg.eval.steps
    sampler = sampler or cfg.eval.sampler
    guidance_scale = cfg.eval.guidance_scale if guidance_scale is None else guidance_scale
    task, device = cfg.task, dist_info.device
    dtype = next(model.parameters()).dtype
    weights = read_head(dataset.path, task.target_dim)
    head = GlobalHead.from_weights(weights.tensors, weights.layer_norm_eps).to(device) if weights else None
    mode = cfg.flow.head if head is not None else "mean"
    if mode == "cls" and not task.target_cls:
        mode = "mean"
    has_text = getattr(dataset, "text_dim", None) is not None
    patches = slice(1, None) if task.target_cls else slice(None)
    if norm is None:
        stats = read_stats(dataset.path, dataset.cond_dim, dataset.target_dim) if needs_stats(cfg.flow) else None
        norm = FlowNorm(cfg.flow, stats.tensors() if stats else None)
    norm = norm.to(device)

    def embed(tokens):
        return global_embedding(tokens.to(dtype if head is None else torch.float32), head, mode, task.target_cls)

    pin = cfg.data.pin_memory and device.type == "cuda"
    budget = rank_budget(max_samples, dist_info)
    loader = EvalLoader(dataset, split, cfg.eval.batch_size, dist_info.rank, dist_info.world_size,
                              cfg.data.num_workers, pin_memory=pin)
    total = dataset.split_samples(split)
    bar = None
    if progress and dist_info.is_main:
        bar = tqdm(total=min(total, max_samples) if max_samples else total, desc=f"eval ({sampler}, {steps} steps)",
                   unit="sample", dynamic_ncols=True, disable=None)
    collected = _Collected()
    seen = 0
    model.eval()
    for batch_index, batch in enumerate(loader):
        target = to_device(batch, "target", device, torch.float32)
        cond = norm.cond(to_device(batch, "cond", device, torch.float32)).to(dtype)
        if budget is not None:
            if seen >= budget:
                break
            keep = budget - seen
            target, cond = target[:keep], cond[:keep]
            batch = {k: (v[:keep] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
        g = distributed.generator(device, seed, dist_info.rank, batch_index)
        pred = sample(model, cond, steps, sampler, cfg.eval.timestep_shift, guidance_scale, generator=g).float()
        pred = norm.target.inverse(pred)  # compared in the data's units
        noise = norm.target.inverse(torch.randn(pred.shape, generator=g, device=device))  # the sampler's start
        collected.add(
            patch_cos=_token_cos(pred[:, patches], target[:, patches]),
            chance_patch_cos=_token_cos(noise[:, patches], target[:, patches]),
            target_sum=target.sum(dim=0, keepdim=True),
            count=torch.tensor([target.shape[0]]),
            emb_model=embed(pred), emb_oracle=embed(target), emb_chance=embed(noise),
        )
        if task.target_cls:
            collected.add(cls_cos=_token_cos(pred[:, :1], target[:, :1]),
                          chance_cls_cos=_token_cos(noise[:, :1], target[:, :1]))
        if has_text:
            text, mask = batch["text"].float(), batch["text_mask"]
            collected.add(text=text.flatten(0, 1)[mask.flatten()], caption_count=mask.sum(dim=1))
        seen += target.shape[0]
        if bar is not None:
            bar.update(target.shape[0] * dist_info.world_size)
    if bar is not None:
        bar.close()
    # the dataset-mean baseline needs the global mean target: one more cheap pass over the targets
    everything = collected.gathered()
    if "count" not in everything or int(everything["count"].sum()) == 0:
        raise UserError(f"the {split} split produced no valid samples to evaluate")
    if has_text and bool((everything["caption_count"] == 0).any()):
        missing = int((everything["caption_count"] == 0).sum())
        raise UserError(f"{missing} of {int(everything['count'].sum())} samples of the {split} split have no caption, "
                        f"and image->text Recall@K needs one per image: extract skips such images; evaluate a split "
                        f"whose samples all have captions")
    mean_target = (everything["target_sum"].sum(0) / everything["count"].sum()).to(device)
    mean_collected = _Collected()
    seen = 0
    for batch in EvalLoader(dataset, split, cfg.eval.batch_size, dist_info.rank, dist_info.world_size,
                            cfg.data.num_workers, pin_memory=pin):
        target = to_device(batch, "target", device, torch.float32)
        if budget is not None:
            if seen >= budget:
                break
            target = target[:budget - seen]
        mean_pred = mean_target.expand_as(target)
        mean_collected.add(mean_patch_cos=_token_cos(mean_pred[:, patches], target[:, patches]))
        if task.target_cls:
            mean_collected.add(mean_cls_cos=_token_cos(mean_pred[:, :1], target[:, :1]))
        seen += target.shape[0]
    everything.update(mean_collected.gathered())
    return _report(everything, has_text, task.target_cls, mode, head is not None, dict(
        split=split, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
        timestep_shift=cfg.eval.timestep_shift, batch_size=cfg.eval.batch_size, fused_ops=cfg.model.fused_ops,
        total_in_split=total))


def _report(c: dict, has_text: bool, has_cls: bool, mode: str, has_head: bool, settings: dict) -> dict:
    n = int(c["count"].sum())
    mean_emb = F.normalize(c["emb_oracle"].mean(0, keepdim=True), dim=-1)
    metrics = {
        "patch_cosine": {"model": c["patch_cos"].mean().item(), "oracle": 1.0,
                         "dataset_mean": c["mean_patch_cos"].mean().item(),
                         "chance": c["chance_patch_cos"].mean().item()},
        "global_cosine": {
            "model": (c["emb_model"] * c["emb_oracle"]).sum(-1).mean().item(), "oracle": 1.0,
            "dataset_mean": (mean_emb * c["emb_oracle"]).sum(-1).mean().item(),
            "chance": (c["emb_chance"] * c["emb_oracle"]).sum(-1).mean().item()},
    }
    if has_cls:
        metrics["cls_cosine"] = {"model": c["cls_cos"].mean().item(), "oracle": 1.0,
                                 "dataset_mean": c["mean_cls_cos"].mean().item(),
                                 "chance": c["chance_cls_cos"].mean().item()}
    if has_text:
        text = F.normalize(c["text"], dim=-1)
        owner = torch.repeat_interleave(torch.arange(n), c["caption_count"].long())
        positives = owner[None, :] == torch.arange(n)[:, None]
        by = {"model": c["emb_model"], "oracle": c["emb_oracle"], "dataset_mean": mean_emb.expand(n, -1)}
        recalls = {name: recall_at_k(emb @ text.T, positives) for name, emb in by.items()}
        recalls["chance"] = chance_recall(c["caption_count"], int(text.shape[0]))
        for k in RECALL_KS:
            metrics[f"recall@{k}"] = {name: recalls[name][k] for name in BASELINES}
    return {"samples": n, "global_embedding": f"{mode} through head.safetensors" if has_head else "mean-pooled tokens",
            **settings, "metrics": metrics}


def sampling_label(report: dict) -> str:
    """`euler 4 steps`, with `, shift 3` when the report's time grid was shifted."""
    shift = report.get("timestep_shift", 1.0)
    return f"{report.get('sampler')} {report.get('steps')} steps" + (f", shift {shift:g}" if shift != 1.0 else "")


def report_name(prefix: str, report: dict) -> str:
    """A report's file name: every sampling setting that changes the numbers is in it (a sweep keeps each one)."""
    name = f"{prefix}-{report['sampler']}{report['steps']}"
    if report.get("timestep_shift", 1.0) != 1.0:
        name += f"-s{report['timestep_shift']:g}"
    if report["guidance_scale"] != 1.0:
        name += f"-g{report['guidance_scale']}"
    return name


def format_report(report: dict) -> str:
    header = (f"{report['samples']} samples of split '{report['split']}', {sampling_label(report)}, "
              f"guidance {report['guidance_scale']}, global embedding: {report['global_embedding']}")
    lines = [header, f"{'metric':16s}" + "".join(f"{b:>14s}" for b in BASELINES)]
    for name, row in report["metrics"].items():
        lines.append(f"{name:16s}" + "".join(f"{row[b]:14.4f}" for b in BASELINES))
    return "\n".join(lines)


def flat_metrics(report: dict) -> dict[str, float]:
    """The model's value of every metric, plus the oracle's recall@1, for metrics.jsonl."""
    out = {name: row["model"] for name, row in report["metrics"].items()}
    if "recall@1" in report["metrics"]:
        out["oracle_recall@1"] = report["metrics"]["recall@1"]["oracle"]
    return out


def save_report(report: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, text_path = out_dir / f"{name}.json", out_dir / f"{name}.txt"
    json_path.write_text(json.dumps(report, indent=1))
    text_path.write_text(format_report(report) + "\n")
    return json_path, text_path


# -- entry points ---------------------------------------------------------------------------------


def build_eval_model(cfg, weights: dict[str, torch.Tensor], device: torch.device) -> DiT:
    model = DiT(cfg.model, cfg.task)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"the checkpoint's weights do not fit the run's model config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}): evaluate with the config the run was trained with")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval()
