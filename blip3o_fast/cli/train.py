"""`blip3o-fast train --config FILE [section.key=value ...]`.

One process:      blip3o-fast train --config demo   (a shipped name: `blip3o-fast config list`; or a YAML path)
Many on one node: torchrun --nproc_per_node 8 -m blip3o_fast.cli train --config ...
                  deepspeed --num_gpus 8 --module blip3o_fast.cli train --config ...
Many nodes:       deepspeed --hostfile hosts --module blip3o_fast.cli train --config ...
SLURM:            srun python -m blip3o_fast.cli train --config ...   (docs/slurm/train.sbatch)
"""

from __future__ import annotations

import argparse


def run(args) -> int:
    from ..config import load_config
    from ..engine import train

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    cfg = load_config(args.config, overrides)
    return train(cfg, cfg.train.out_dir, resume=args.resume)


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a DiT with DeepSpeed (one process, torchrun or deepspeed)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a shipped config name (`blip3o-fast config list`) or a YAML path")
    p.add_argument("--out", default=None, help="run folder (overrides train.out_dir)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint of the run folder, if any), none, or a checkpoint folder")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None, metavar="JSON",
                   help="a DeepSpeed JSON merged over the generated config (train.deepspeed_config)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(run=run)
