"""`blip3o-fast eval --run DIR` (or `--model EXPORT --data DATASET`): sample held-out targets with a checkpoint's
EMA weights (or an exported model's) and report per-patch cosine, global cosine and image->text Recall@1/5/10
beside their baselines.

Runs in one process or under torchrun (samples split across ranks; there spell --run as --run-dir). The report lands in
<run>/eval/<checkpoint>-<sampler><steps>.json and .txt and is printed as a table. Config overrides
(`section.key=value`, e.g. model.fused_ops=false, eval.batch_size=16) apply to the run's or model's config.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def run_model(args) -> int:
    """`eval --model DIR`: an exported model (or any folder FeatureGenerator loads), on --data."""
    from ..data import check_compatible, open_dataset
    from ..errors import UserError
    from ..evaluation import evaluate, format_report, report_name, save_report
    from ..inference import FeatureGenerator
    from ..runtime import distributed

    if not args.data:
        raise UserError("eval --model needs --data DATASET (an exported model does not know its training data)")
    from ..config import apply_overrides, from_dict
    from ..inference.pretrained import resolve

    dist_info = distributed.init()
    cfg, state, head, provenance, stats = resolve(args.model, None)
    cfg = from_dict(apply_overrides(cfg.to_dict(), _overrides(args)))
    gen = FeatureGenerator(cfg, state, head, provenance, device=dist_info.device, stats=stats)
    if gen.cfg.model.fused_ops:  # as the trainer: a build without kernels for this device fails here, in one line
        from ..ops import check_device

        check_device(dist_info.device)
    cfg = gen.cfg
    cfg.data.path = args.data
    dataset = open_dataset(args.data)
    check_compatible(dataset, cfg.task)
    max_samples = cfg.eval.max_samples if args.max_samples is None else args.max_samples
    report = evaluate(gen.model, dataset, cfg, dist_info, split=args.split, max_samples=max_samples,
                      steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance, seed=args.seed,
                      norm=gen.norm)
    report["model"] = str(args.model)
    if dist_info.is_main:
        name = report_name("model", report)
        json_path, _ = save_report(report, Path(args.out) if args.out else Path(args.model) / "eval", name)
        print(format_report(report))
        print(f"report: {json_path}")
    return 0


def _overrides(args) -> list[str]:
    """The eval flags as config overrides, then the user's own `section.key=value`."""
    flags = {"eval.batch_size": args.batch_size, "eval.timestep_shift": args.timestep_shift}
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)


def run(args) -> int:
    if args.model:
        return run_model(args)
    from ..config import load_config
    from ..data import check_compatible, open_dataset
    from ..errors import UserError
    from ..evaluation import build_eval_model, evaluate, format_report, report_name, save_report
    from ..runtime import distributed
    from ..runtime.checkpoint import MARKER, Checkpointer, load_ema_weights

    run_dir = Path(args.run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml): pass the folder `blip3o-fast train` wrote")
    overrides = ([f"data.path={args.data}"] if args.data else []) + _overrides(args)
    cfg = load_config(config_file, overrides)
    dist_info = distributed.init()
    if cfg.model.fused_ops:  # as the trainer: a build without kernels for this device fails here, in one line
        from ..ops import check_device

        check_device(dist_info.device)
    checkpointer = Checkpointer(run_dir, keep_last=1, dist=dist_info)
    if args.checkpoint:
        checkpoint = run_dir / "checkpoints" / args.checkpoint
        if not checkpoint.is_dir():
            checkpoint = Path(args.checkpoint)
    else:
        complete = checkpointer.complete()
        if not complete:
            raise UserError(f"{run_dir} has no complete checkpoint (folders with a {MARKER} marker) to evaluate")
        checkpoint = complete[-1]
    weights = load_ema_weights(checkpoint)
    dataset = open_dataset(cfg.data.path)
    check_compatible(dataset, cfg.task)
    model = build_eval_model(cfg, weights, dist_info.device)
    max_samples = cfg.eval.max_samples if args.max_samples is None else args.max_samples
    report = evaluate(model, dataset, cfg, dist_info, split=args.split, max_samples=max_samples,
                      steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance, seed=args.seed,
                      norm=_training_norm(cfg, config_file) if args.data else None)
    report["checkpoint"] = str(checkpoint)
    if dist_info.is_main:
        name = report_name(checkpoint.name, report)
        json_path, _ = save_report(report, Path(args.out) if args.out else run_dir / "eval", name)
        print(format_report(report))
        print(f"report: {json_path}")
    return 0


def _training_norm(cfg, config_file: Path):
    """The normalisation the run was trained with: its own dataset's statistics, also when --data evaluates another
    dataset (docs/architecture.md §3.1.1)."""
    from ..config import load_config
    from ..data import read_stats
    from ..model.normalize import FlowNorm, needs_stats

    trained_on = Path(load_config(config_file).data.path)
    stats = (read_stats(trained_on, cfg.task.cond_dim, cfg.task.target_dim)
             if trained_on.is_dir() and needs_stats(cfg.flow) else None)
    return FlowNorm(cfg.flow, stats.tensors() if stats is not None else None)


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run's checkpoint by sampling (cosines, retrieval recall)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    # torchrun's own parser reads `--run` as an ambiguous prefix of its --run-path: spell it --run-dir there
    which.add_argument("--run", "--run-dir", dest="run_dir", help="run folder written by `blip3o-fast train`")
    which.add_argument("--model", help="model folder written by `blip3o-fast export` (needs --data)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint tag (step-NNNNNNN) or folder; default: the newest complete one")
    p.add_argument("--data", default=None, help="dataset folder (default: the run's data.path)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the run's data.eval_split)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's eval.steps)")
    p.add_argument("--sampler", choices=["euler", "heun"], default=None, help="ODE sampler (default: eval.sampler)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: eval's)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="evaluate at most this many samples, 0 for all (default: eval.max_samples)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per sampling batch (default: eval.batch_size)")
    p.add_argument("--timestep-shift", type=float, default=None,
                   help="SD3's timestep shift, > 1 spends more steps near the noise (default: eval.timestep_shift)")
    p.add_argument("--seed", type=int, default=0, help="sampling noise seed")
    p.add_argument("--out", default=None, help="folder for the report (default: <run>/eval or <model>/eval)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. model.fused_ops=false (run the model on the reference ops)")
    p.set_defaults(run=run)
