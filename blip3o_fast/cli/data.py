"""`blip3o-fast data synth|convert-chunks|convert|subset|stats|inspect` and `blip3o-fast extract` (argparse only;
the work is imported inside each command so `blip3o-fast --help` stays fast)."""

from __future__ import annotations

import argparse
import json

from ..config import TASKS


def run_synth(args) -> int:
    from ..data.synth import PRESETS, SynthSpec, write_synth

    preset = dict(PRESETS[args.preset])
    for key in ("grid", "cond_dim", "target_dim", "text_dim", "target_cls"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    spec = SynthSpec(seed=args.seed, train_samples=args.train_samples, eval_samples=args.eval_samples,
                     shard_size=args.shard_size, cond_cls=args.cond_cls, captions=tuple(args.captions),
                     latent_dim=args.latent_dim, noise=args.noise, caption_noise=args.caption_noise, task=args.task,
                     outlier_channels=args.outlier_channels, outlier_scale=args.outlier_scale,
                     storage=_storage(args.storage), storage_target=_storage(args.storage_target),
                     int8_scale=args.int8_scale,
                     grid=tuple(preset["grid"]), cond_dim=preset["cond_dim"], target_dim=preset["target_dim"],
                     text_dim=preset["text_dim"], target_cls=preset["target_cls"])
    summary = write_synth(args.out, spec, overwrite=args.overwrite, progress=not args.quiet)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    for split, s in summary["splits"].items():
        print(f"{split:6s} {s['samples']:7d} samples in {s['shards']} shards; "
              f"oracle image->text R@1 {s['oracle_recall_at_1']:.3f} (chance {1 / max(s['samples'], 1):.4f})")
    print(f"wrote {args.out}")
    return 0


def run_convert(args) -> int:
    from ..data.convert import convert_chunks

    summary = convert_chunks(args.src, args.out, trust_pickle=args.trust_pickle, task=args.task,
                             shard_size=args.shard_size, eval_shards=args.eval_shards, grid=args.grid,
                             clip_model=args.clip_model, overwrite=args.overwrite, progress=not args.quiet,
                             eval_fraction=args.eval_fraction)
    for split, s in summary["splits"].items():
        print(f"{split:6s} {s['samples']:7d} samples in {s['shards']} shards, {s['skipped']} skipped")
    print(f"wrote {args.out}")
    return 0


def run_requantize(args) -> int:
    from ..data.requantize import convert_dataset

    summary = convert_dataset(args.src, args.out, _storage(args.storage), _storage(args.storage_target),
                              args.int8_scale, overwrite=args.overwrite, progress=not args.quiet)
    for split, s in summary.items():
        print(f"{split:6s} {s['samples']:7d} samples in {s['shards']} shards, {s['skipped']} skipped")
    print(f"wrote {args.out}")
    return 0


def run_subset(args) -> int:
    from ..data.subset import subset_dataset

    summary = subset_dataset(args.path, args.out, args.samples, split=args.split, overwrite=args.overwrite,
                             progress=not args.quiet)
    skipped = f", {summary['skipped']} bad samples skipped" if summary["skipped"] else ""
    print(f"train  {summary['samples']:7d} samples (the first of split {args.split!r}) in {summary['shards']} "
          f"shards{skipped}")
    print(f"wrote {args.out}")
    return 0


def run_stats(args) -> int:
    from ..data import open_dataset
    from ..data.stats import write_dataset_stats

    dataset = open_dataset(args.path)
    stats = write_dataset_stats(dataset, args.split, progress=not args.quiet)
    for name, mean, std in (("cond", stats.cond_mean, stats.cond_std), ("target", stats.target_mean, stats.target_std)):
        if mean is not None:
            print(f"{name:6s} {mean.numel()} channels: |mean| max {mean.abs().max():.4g}, std min {std.min():.4g} "
                  f"median {std.median():.4g} max {std.max():.4g}")
    print(f"{stats.samples} samples of split {args.split!r}; wrote {dataset.path / 'stats.safetensors'}")
    return 0


def run_inspect(args) -> int:
    from ..data.inspect import inspect_dataset

    return inspect_dataset(args.path, verify=not args.no_verify, samples=args.samples, as_json=args.json,
                           progress=not args.quiet)


def run_extract(args) -> int:
    from ..data.encoders import require_extract_extra

    require_extract_extra("extract")
    from ..data.extract import ExtractOptions, extract

    options = ExtractOptions(
        images=args.images, out=args.out, target_model=args.target_model, cond_model=args.cond_model,
        task=args.task, split=args.split, eval_fraction=args.eval_fraction, max_captions=args.max_captions,
        batch_size=args.batch_size, workers=args.workers,
        target_cls=args.target_cls, cond_cls=args.cond_cls, shard_size=args.shard_size, dtype=args.dtype,
        storage=_storage(args.storage), storage_target=_storage(args.storage_target), int8_scale=args.int8_scale,
        text_model=args.text_model, image_processor=args.image_processor,
        trust_remote_code=args.trust_remote_code, progress=not args.quiet)
    summary = extract(options)
    if summary is not None:
        written = ", ".join(f"{n} to {split}" for split, n in summary["splits"].items())
        print(f"{summary['samples']} samples ({written}), {summary['skipped']} skipped; {args.out} now holds "
              f"{summary['sources']} extracted input shards in {summary['shards']} shards")
    return 0


def _storage(choice: str) -> str:
    """The CLI's float16 | int8 as the manifest's storage (float: the members hold float16)."""
    return "int8" if choice == "int8" else "float"


def _add_storage(p) -> None:
    p.add_argument("--storage", choices=("float16", "int8"), default="float16",
                   help="condition tokens as float16, or int8 with float32 scales (half the bytes)")
    p.add_argument("--storage-target", choices=("float16", "int8"), default="float16",
                   help="target tokens as float16 or int8 (the generated stream: int8 costs its precision)")
    p.add_argument("--int8-scale", choices=("token", "channel"), default="channel",
                   help="one int8 scale per channel of each sample, or per token (worse with CLIP-like outlier "
                        "channels: bench/bench_data.py)")


def _grid(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", " ").replace(",", " ").split()
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"grid must look like 8x8 or 16, got {text!r}")
    return int(parts[0]), int(parts[1])


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="make, convert and inspect datasets of embedding shards")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = dsub.add_parser(
        "synth", help="write the synthetic dataset (the embedded demo)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="A deterministic synthetic dataset: condition and target token grids that are different "
                    "nonlinear, position-dependent functions of a per-sample latent, caption embeddings tied to "
                    "each sample's global target embedding, a head.safetensors, and train and eval splits. "
                    "--preset demo (default) fits the tiny model on CPU; --preset real writes the real shapes "
                    "(16x16 grid, cond 4096, target 1024, text 768).")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--preset", choices=("demo", "real"), default="demo",
                   help="demo: grid 8x8, cond 64, target 32 with CLS (65 tokens), text 16; "
                        "real: grid 16x16, cond 4096, target 1024 without CLS (256 tokens), text 768")
    p.add_argument("--seed", type=int, default=0, help="the same seed and knobs give the same bytes")
    p.add_argument("--train-samples", type=int, default=4096, help="samples in the train split")
    p.add_argument("--eval-samples", type=int, default=256, help="samples in the held-out eval split")
    p.add_argument("--shard-size", type=int, default=512, help="samples per shard")
    p.add_argument("--grid", type=_grid, default=None, help="patch grid GHxGW (overrides the preset)")
    p.add_argument("--cond-dim", type=int, default=None, help="condition feature dim (overrides the preset)")
    p.add_argument("--target-dim", type=int, default=None, help="target feature dim (overrides the preset)")
    p.add_argument("--text-dim", type=int, default=None, help="caption/global embedding dim (overrides the preset)")
    p.add_argument("--target-cls", action=argparse.BooleanOptionalAction, default=None,
                   help="the target sequence carries a CLS token first (overrides the preset)")
    p.add_argument("--cond-cls", action="store_true", help="the condition sequence carries a CLS token first")
    p.add_argument("--captions", type=int, nargs=2, default=(2, 5), metavar=("MIN", "MAX"),
                   help="captions per sample, drawn uniformly")
    p.add_argument("--latent-dim", type=int, default=8, help="dim of the per-sample latent both streams encode")
    p.add_argument("--noise", type=float, default=0.02, help="std of the noise added to every token")
    p.add_argument("--caption-noise", type=float, default=0.25,
                   help="noise of caption embeddings around the global embedding (lower: easier retrieval)")
    p.add_argument("--outlier-channels", type=int, default=0,
                   help="this many channels of each stream scaled and shifted by up to --outlier-scale, as CLIP's "
                        "few huge channels (what flow.target_norm=channel is for)")
    p.add_argument("--outlier-scale", type=float, default=30.0, help="largest gain of an outlier channel")
    p.add_argument("--task", choices=TASKS, default="eva_to_clip", help="task name recorded in the manifest")
    _add_storage(p)
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_synth)

    p = dsub.add_parser(
        "convert-chunks", help="convert the prior project's pickled embedding chunks to shards",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Reads embeddings_manifest.json and its embeddings_shard_*.pkl (keys eva_blip3o_embeddings, "
                    "clip_blip3o_embeddings, captions, keys, config) one at a time and writes float16 shards. "
                    "Pickle files can run arbitrary code when loaded: only convert files you trust, and say so "
                    "with --trust-pickle. The input is only read.")
    p.add_argument("--src", required=True, help="folder of the prior project's embeddings_manifest.json")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading the pickled shards (runs their code)")
    p.add_argument("--task", choices=TASKS, default="eva_to_clip",
                   help="eva_to_clip: cond = EVA, target = CLIP; clip_to_eva: the reverse")
    p.add_argument("--shard-size", type=int, default=500, help="samples per output shard")
    p.add_argument("--eval-shards", type=int, default=0, help="the last N source shards form the eval split")
    p.add_argument("--eval-fraction", type=float, default=0.0,
                   help="hold out this fraction of samples as the eval split, chosen by a stable hash of the key "
                        "(instead of --eval-shards)")
    p.add_argument("--grid", type=_grid, default=None, help="patch grid (default: the square root of the tokens)")
    p.add_argument("--clip-model", default=None,
                   help="CLIP model (name or path) whose text tower embeds the captions and whose head is saved")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_convert)

    p = dsub.add_parser(
        "convert", help="rewrite a dataset with another storage (int8: half the bytes per sample)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Reads every split of --src (validated, dequantised) and writes it to --out with the storage "
                    "asked for, keeping keys, captions, caption embeddings, splits and the head; the statistics are "
                    "recomputed from what is written. --src is only read.")
    p.add_argument("--src", required=True, help="dataset folder to read")
    p.add_argument("--out", required=True, help="dataset folder to write")
    _add_storage(p)
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_requantize)

    p = dsub.add_parser(
        "subset", help="the first N samples of a split as a new dataset (the overfit mode's data)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Copies the first N samples of one split, in the order evaluation reads them, into --out as "
                    "its split 'train': the stored bytes unchanged (float16 or int8), with captions, the head and "
                    "statistics computed for the subset. `train --config overfit` trains on such a subset and "
                    "evaluates on the same samples (`make overfit`). DATASET is only read.")
    p.add_argument("path", metavar="DATASET", help="dataset folder to read")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--samples", type=int, required=True, help="N: how many samples to keep")
    p.add_argument("--split", default="train", help="split the samples come from")
    p.add_argument("--overwrite", action="store_true", help="replace what is already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_subset)

    p = dsub.add_parser("stats", help="per-channel mean/std of a split into stats.safetensors (flow.target_norm)",
                        description="Reads every sample of the split once and writes the per-channel mean and std "
                                    "of the condition and target tokens to DATASET/stats.safetensors, named in the "
                                    "manifest. synth, convert-chunks and extract write it themselves.")
    p.add_argument("path", help="dataset folder")
    p.add_argument("--split", default="train", help="split the statistics come from (keep the held-out split out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_stats)

    p = dsub.add_parser("inspect", help="manifest summary, checksums and token-norm statistics of a dataset")
    p.add_argument("path", help="dataset folder")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every shard")
    p.add_argument("--samples", type=int, default=256, help="samples per split read for the norm statistics")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_inspect)

    p = sub.add_parser(
        "extract", help="encode image shards with both encoders into a dataset",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Reads WebDataset image shards (jpg/png + txt), runs the target and condition vision "
                    "encoders (Hugging Face transformers, by name or local path) and writes their last-layer "
                    "patch tokens as float16 shards; the CLIP text tower embeds the captions and the CLIP head "
                    "is saved. Runs on several GPUs with `torchrun --nproc_per_node N -m blip3o_fast.cli "
                    "extract ...` (shards split across ranks); finished input shards are skipped on a rerun.")
    p.add_argument("--images", required=True,
                   help="image shards: a brace pattern 'DIR/{00000..00009}.tar', a folder, or remote as webdataset "
                        "reads them: 'https://host/{00000..00009}.tar', 'pipe:aws s3 cp s3://b/{0..9}.tar -', "
                        "'s3://b/{0..9}.tar' (through `aws s3 cp`)")
    p.add_argument("--target-model", required=True, help="encoder of the generated tokens (CLIP for eva_to_clip)")
    p.add_argument("--cond-model", required=True, help="encoder of the condition tokens (EVA-CLIP for eva_to_clip)")
    p.add_argument("--out", required=True, help="dataset folder to write (or to add a split to)")
    p.add_argument("--task", choices=TASKS, default="eva_to_clip", help="task name recorded in the manifest")
    p.add_argument("--split", default="train", help="split the shards are written to")
    p.add_argument("--eval-fraction", type=float, default=0.0,
                   help="hold out this fraction of images as the 'eval' split, chosen by a stable hash of the key "
                        "(the same on every rank and rerun)")
    p.add_argument("--max-captions", type=int, default=5,
                   help="captions kept per image (a .json 'captions' list, e.g. COCO's 5, or a .txt); more are cut")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder batch")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes")
    p.add_argument("--target-cls", action="store_true", help="keep the target encoder's CLS token (first)")
    p.add_argument("--cond-cls", action="store_true", help="keep the condition encoder's CLS token (first)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per output shard")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="encoder precision: auto is bf16 on GPU, fp32 on CPU")
    _add_storage(p)
    p.add_argument("--text-model", default=None,
                   help="CLIP model for caption embeddings and the head (default: whichever encoder is CLIP)")
    p.add_argument("--image-processor", default=None,
                   help="image preprocessing for both encoders (default: the target's, else the cond's)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow models whose code ships with the weights (EVA-CLIP-8B); it runs that code")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_extract)
