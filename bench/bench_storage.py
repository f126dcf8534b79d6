"""Learning with int8 storage against float16: the demo config on the same data, stored three ways, same seed.

    .venv/bin/python bench/bench_storage.py --steps 300 --out build/bench_storage/table.md

`data synth` (the demo's data) is converted with `blip3o-fast data convert --storage int8` (condition only)
and `--storage int8 --storage-target int8` (both streams); each dataset trains the shipped demo config for
`--steps` steps from scratch, seed 0 (and the float16 data again with seed 1: the run-to-run noise the
differences are compared with); `blip3o-fast eval` scores the whole held-out split (Euler, the config's steps,
seed 0). The held-out split is read from each run's own dataset: with int8 targets the reference itself is
quantised. Runs go one at a time, 1 thread each. Not a pytest-benchmark file (its runs take minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_recipe import ROOT, _cli, _train

ROWS = {  # name: (dataset, overrides)
    "float16": ("data", []),
    "float16, train.seed=1 (noise)": ("data", ["train.seed=1"]),
    "int8 condition": ("int8", []),
    "int8 condition + target": ("int8-both", []),
}
CONVERT = {"int8": ["--storage", "int8"], "int8-both": ["--storage", "int8", "--storage-target", "int8"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--work", default=str(ROOT / "build" / "bench_storage"), help="scratch folder (data and runs)")
    p.add_argument("--out", default=None, help="write the markdown table here")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data" / "manifest.json").is_file():
        _cli("data", "synth", "--out", str(work / "data"), "--quiet")
    for name, flags in CONVERT.items():
        if not (work / name / "manifest.json").is_file():
            _cli("data", "convert", "--src", str(work / "data"), "--out", str(work / name), "--quiet", *flags)
    sizes = {name: sum(f.stat().st_size for f in (work / name).glob("train-*.tar")) for name in ["data", *CONVERT]}
    rows = []
    for name, (data, overrides) in ROWS.items():
        run = work / "".join(c if c.isalnum() else "_" for c in name)
        cpu = _train(work / data, run, args.steps, overrides)
        _cli("eval", "--run", str(run), "--max-samples", "0", "--seed", "0", "--out", str(work / "eval" / run.name))
        report = json.loads(max((work / "eval" / run.name).glob("*.json"), key=lambda q: q.stat().st_mtime).read_text())
        m = report["metrics"]
        row = {"run": name, "steps": args.steps, "train_cpu_s": round(cpu, 1), "train_bytes": sizes[data],
               "patch_cosine": m["patch_cosine"]["model"], "recall@1": m["recall@1"]["model"],
               "oracle_recall@1": m["recall@1"]["oracle"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"The demo config, {args.steps} steps, `data synth` defaults; held-out split (all samples), Euler. "
             f"Command: `python bench/bench_storage.py --steps {args.steps}`.", "",
             "| run | train split bytes | train CPU s | patch cosine | R@1 | oracle R@1 |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['train_bytes'] / 1e6:.1f} MB | {r['train_cpu_s']} | {r['patch_cosine']:.4f} | "
              f"{r['recall@1']:.3f} | {r['oracle_recall@1']:.3f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
