"""`blip3o-fast generate --model DIR --data DATASET --out OUT`: the model's target tokens for every sample
of a split, written as a dataset of this project's format (same keys, the source's condition, captions and
text embeddings, the generated tokens as target.npy). Conditions without targets are fine.

Runs in one process or under torchrun (`torchrun --nproc_per_node N -m blip3o_fast.cli generate ...`): the
input shards split across ranks and the output is byte-identical to one process. A rerun of the same command
after a kill resumes from the finished shards (docs/architecture.md §3.13).
"""

from __future__ import annotations

import argparse


def run(args) -> int:
    from ..inference import FeatureGenerator
    from ..inference.generate import generate_dataset
    from ..runtime import distributed

    dist = distributed.init()
    gen = FeatureGenerator.from_pretrained(args.model, device=dist.device, dtype=args.dtype, weights=args.weights)
    summary = generate_dataset(gen, args.data, args.out, split=args.split, steps=args.steps, sampler=args.sampler,
                               guidance_scale=args.guidance, timestep_shift=args.timestep_shift, seed=args.seed,
                               batch_size=args.batch_size, progress=not args.quiet, dist=dist)
    if summary is not None:
        print(f"generated {summary['samples']} samples in {summary['seconds']:.1f} s: "
              f"{summary['samples_per_s']:.1f} samples/s; {summary['shards']} shards in {args.out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate target tokens for a dataset split with a trained model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export folder, run folder or checkpoint folder")
    p.add_argument("--data", required=True, help="dataset folder with the conditions (targets not needed)")
    p.add_argument("--split", default="eval", help="split to generate for")
    p.add_argument("--out", required=True, help="dataset folder to write (rerun the same command to resume)")
    p.add_argument("--steps", type=int, default=30, help="sampler steps")
    p.add_argument("--sampler", choices=["euler", "heun"], default="euler", help="ODE sampler")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--timestep-shift", type=float, default=1.0, help="SD3's timestep shift (1: none)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (each sample's noise: this seed and its key)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per model batch (per process)")
    p.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="for a run or checkpoint: ema (default) or raw weights")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="model precision (default: bf16 on GPU, fp32 on CPU); the ODE state stays fp32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
