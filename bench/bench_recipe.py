"""The demo recipe's ablation table: each change against the baseline, same data, same seed, same CPU-time budget.

    .venv/bin/python bench/bench_recipe.py --budget 150 --out docs/recipe-table.md
    .venv/bin/python bench/bench_recipe.py --only baseline recipe        # a subset
    .venv/bin/python bench/bench_recipe.py --jobs 2                      # two variants at a time (2 cores)

Every variant is the shipped demo config (blip3o_fast/configs/demo.yaml) plus its overrides. Its step count is
fitted to the budget: a 30-step probe measures the variant's CPU seconds per step (its own model size, batch and
flow), then it trains `budget / (s/step)` steps from scratch (so its LR schedule ends where the budget does), and
`blip3o-fast eval` scores the held-out split: patch cosine and Recall@1 beside the oracle's. CPU time is the
training process's user + system time (its rusage from os.wait4), with one thread
(OMP_NUM_THREADS=1), so a busy shared machine changes wall time, not the budget. `--jobs N` trains N variants
at a time (each still one thread); variants that share a probe or a trained run wait for it.

Not a pytest-benchmark file (its runs take minutes): `make bench` does not collect it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "blip3o_fast" / "configs" / "demo.yaml"

# the recipe before issue 19 (what `make demo` shipped): the baseline every change is measured against
BASELINE = ["flow.target_norm=none", "flow.cond_norm=none", "train.lr=1e-2", "train.ema_decay=0.99",
            "data.batch_size=32", "flow.timestep_sampling=logit_normal", "flow.logit_mean=0", "eval.sampler=euler",
            "eval.steps=20", "eval.timestep_shift=1", "flow.contrastive_weight=0", "flow.cls_loss_weight=0",
            "model.cond_add=false"]
INT8_DATA = "data.path=<int8>"  # the same samples, `data convert --storage int8` (docs/recipe.md "Storage")
# each change alone on top of the baseline, then the shipped recipe (demo.yaml as it is, nothing overridden)
VARIANTS = {
    "baseline": BASELINE,
    "cond_add": BASELINE + ["model.cond_add=true"],
    "logit_mean=-0.8": BASELINE + ["flow.logit_mean=-0.8"],
    "timesteps=uniform": BASELINE + ["flow.timestep_sampling=uniform"],
    "cls_loss_weight=0.3": BASELINE + ["flow.cls_loss_weight=0.3"],
    "contrastive_weight=0.1": BASELINE + ["flow.contrastive_weight=0.1"],
    "lr=3e-3": BASELINE + ["train.lr=3e-3"],
    "ema_decay=0.995": BASELINE + ["train.ema_decay=0.995"],
    "batch_size=64": BASELINE + ["data.batch_size=64"],
    "wider (hidden 192, depth 3)": BASELINE + ["model.hidden_size=192", "model.depth=3", "model.num_heads=4"],
    "storage=int8 (condition)": BASELINE + [INT8_DATA],
    "recipe (demo.yaml)": [],
    # sampling the recipe's trained run (no training of their own); demo.yaml samples Euler 4 steps with shift 3
    "recipe, euler 4 steps, no shift": ["eval.timestep_shift=1"],
    "recipe, euler 1 step": ["eval.steps=1"],
    "recipe, euler 2 steps, no shift": ["eval.steps=2", "eval.timestep_shift=1"],
    "recipe, euler 20 steps, no shift": ["eval.steps=20", "eval.timestep_shift=1"],
    "recipe, euler 50 steps, no shift": ["eval.steps=50", "eval.timestep_shift=1"],
    "recipe, heun 10 steps, no shift": ["eval.sampler=heun", "eval.steps=10", "eval.timestep_shift=1"],
}
PROBE_STEPS = 30


def _env() -> dict:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return env


def _cli(*args: str) -> float:
    """Runs one blip3o-fast command; returns its CPU seconds (user + system of that child alone: wait4's rusage,
    not RUSAGE_CHILDREN, which would count the other jobs' children too)."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "blip3o_fast.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=_env(), cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{args[0]} failed ({proc.returncode}):\n{log.read().decode(errors='replace')[-4000:]}")
    return usage.ru_utime + usage.ru_stime


def _train(data: Path, run: Path, steps: int, overrides: list[str]) -> float:
    shutil.rmtree(run, ignore_errors=True)  # from scratch: an existing run folder would be resumed
    overrides = [f"data.path={_int8(data)}" if o == INT8_DATA else o for o in overrides]
    return _cli("train", "--config", str(CONFIG), "--out", str(run), f"data.path={data}", f"train.steps={steps}",
                f"train.ckpt_every={steps}", "train.eval_every=0", "data.num_workers=0", *overrides)


def _int8(data: Path) -> Path:
    """The demo data with an int8 condition: the same samples, requantised once (a later override wins)."""
    out = data.parent / "data-int8"
    with _lock(("int8",)):
        if not (out / "manifest.json").is_file():
            _cli("data", "convert", "--src", str(data), "--out", str(out), "--storage", "int8", "--overwrite",
                 "--quiet")
    return out


COST_KEYS = ("model.", "data.batch_size", "flow.contrastive_weight")  # what changes the CPU cost of a step
_per_step: dict[tuple, float] = {}
_trained: dict[tuple, tuple[Path, int, float, float]] = {}
_locks: dict[tuple, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(key: tuple) -> threading.Lock:
    """One lock per probe or trained run: a second variant needing it waits instead of repeating the work."""
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _cost_per_step(overrides: list[str], data: Path, work: Path) -> float:
    """CPU seconds per training step of this model size and batch: two probe runs separate the start-up."""
    key = tuple(o for o in overrides if o.startswith(COST_KEYS))
    with _lock(("probe",) + key):
        if key not in _per_step:
            _per_step[key] = _probe(key, overrides, data, work)
    return _per_step[key]


def _probe(key: tuple, overrides: list[str], data: Path, work: Path) -> float:
    slug = "probe-" + "".join(c if c.isalnum() else "_" for c in "-".join(key))[:80]
    _train(data, work / f"{slug}-warm", 1, overrides)  # one-off costs first (a JIT build of a DeepSpeed op)
    short = _train(data, work / f"{slug}-a", PROBE_STEPS // 3, overrides)
    long = _train(data, work / f"{slug}-b", PROBE_STEPS, overrides)
    if long <= short:
        raise SystemExit(f"probe of {key}: {PROBE_STEPS} steps took {long:.1f} CPU-s, {PROBE_STEPS // 3} took "
                         f"{short:.1f}: the start-up is not the same in both; rerun")
    return (long - short) / (PROBE_STEPS - PROBE_STEPS // 3)


def run_variant(name: str, overrides: list[str], data: Path, work: Path, budget: float) -> dict:
    steps = max(50, int(budget / _cost_per_step(overrides, data, work)))
    # variants that differ only in eval.* share one trained run (training is the same computation)
    train_key = tuple(o for o in overrides if not o.startswith("eval."))
    with _lock(("train",) + train_key):
        if train_key not in _trained:
            run = work / "".join(c if c.isalnum() else "_" for c in name)
            wall = time.perf_counter()
            cpu = _train(data, run, steps, list(train_key))
            _trained[train_key] = (run, steps, cpu, time.perf_counter() - wall)
    run, steps, cpu, wall = _trained[train_key]
    out = work / "eval" / "".join(c if c.isalnum() else "_" for c in name)  # one folder per variant
    shutil.rmtree(out, ignore_errors=True)
    args = ["eval", "--run", str(run), "--max-samples", "0", "--seed", "0", "--out", str(out)]
    flags = {"eval.sampler=": "--sampler", "eval.steps=": "--steps", "eval.timestep_shift=": "--timestep-shift"}
    for o in overrides:
        for prefix, flag in flags.items():
            if o.startswith(prefix):
                args += [flag, o.split("=", 1)[1]]
    _cli(*args)
    report = json.loads(next(out.glob("*.json")).read_text())
    m = report["metrics"]
    return {"variant": name, "overrides": overrides, "steps": steps, "train_cpu_s": round(cpu, 1),
            "train_wall_s": round(wall, 1), "patch_cosine": m["patch_cosine"]["model"],
            "recall@1": m["recall@1"]["model"], "oracle_recall@1": m["recall@1"]["oracle"],
            "sampler": f"{report['sampler']} {report['steps']}"
                       + (f", shift {report['timestep_shift']:g}" if report.get("timestep_shift", 1) != 1 else "")}


def table(rows: list[dict], budget: float, command: str) -> str:
    lines = [f"Budget {budget:g} CPU-s of training per variant (1 thread), demo data (`data synth` defaults), "
             f"seed 0; held-out split (256 samples). Command: `{command}`.", "",
             "| variant | steps | train CPU s | sampler | patch cosine | R@1 | R@1 / oracle |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['steps']} | {r['train_cpu_s']} | {r['sampler']} | "
                     f"{r['patch_cosine']:.4f} | {r['recall@1']:.3f} | {r['recall@1'] / r['oracle_recall@1']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=150.0, help="training CPU seconds per variant")
    p.add_argument("--work", default=str(ROOT / "build" / "bench_recipe"), help="scratch folder (data and runs)")
    p.add_argument("--only", nargs="*", default=None, help="variant names (or prefixes) to run")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at a time (each one thread)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        _cli("data", "synth", "--out", str(data), "--quiet")
    names = [n for n in VARIANTS if args.only is None or any(n.startswith(o) for o in args.only)]
    def one(name: str) -> dict:
        row = run_variant(name, VARIANTS[name], data, work, args.budget)
        print(json.dumps(row), flush=True)
        with open(work / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # subprocesses do the work; rows keep the table's order
        rows = list(pool.map(one, names))
    command = "python bench/bench_recipe.py --budget " + f"{args.budget:g}" + f" --jobs {args.jobs}" + (
        " --only " + " ".join(f"'{o}'" for o in args.only) if args.only else "")
    text = table(rows, args.budget, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
