"""`blip3o-fast export RUN_OR_CHECKPOINT --out DIR`: a trained model as a self-contained folder
(model.safetensors, config.json, head.safetensors, eval.json, loss.png, README.md model card), optionally
uploaded to the Hugging Face Hub (docs/architecture.md §3.13)."""

from __future__ import annotations

import argparse


def run(args) -> int:
    from pathlib import Path

    from ..inference import FeatureGenerator
    from ..inference.export import push_to_hub

    gen = FeatureGenerator.from_pretrained(args.source, device="cpu", dtype="fp32", weights=args.weights)
    out = gen.save_pretrained(Path(args.out))
    print(f"exported {gen.provenance.weights} weights of {gen.provenance.source} "
          f"({gen.num_parameters():,} parameters) to {out}")
    if args.push_to_hub:
        print(f"uploaded to {push_to_hub(out, args.push_to_hub, private=args.private)}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="write a trained model as a self-contained folder (and push it to the Hub)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="run folder (its newest complete checkpoint), checkpoint folder or export folder")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="ema (default): the averaged weights; raw: DeepSpeed's trained weights (ZeRO 0-2)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="also upload the folder to this Hugging Face model repository (needs the `hub` extra)")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    p.set_defaults(run=run)
