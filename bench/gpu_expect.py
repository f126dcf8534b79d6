"""The GPU run's predictions and its measured-vs-predicted tables, from the card's measured ceilings
(bench/gpu_roofline.py's JSON), so each benchmark stage reads as measured against predicted:

    python bench/gpu_expect.py ops   --roofline R.json [--bench B.json] [--device cuda] [--shape base]
    python bench/gpu_expect.py steps --roofline R.json [--bench B.json] [--device cuda] [--case base-eva_to_clip-256]

Without --bench: the prediction only (ops: the bytes each pass must move / the measured copy bandwidth;
steps: the matmul FLOPs of a step / the measured bf16 matmul rate, i.e. samples/s at 100% of it). With
--bench: the pytest-benchmark JSON's results beside the prediction (ops: % of copy bandwidth, the fused
op's speed over torch.compile of its reference; steps: samples/s, MFU against the measured matmul rate and
against the datasheet peak where known, speed over unfused, compiled and the prior style).
Nothing here is a GPU number until the JSON it reads was measured on one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def _load(path):
    with open(path) as f:
        return json.load(f)


def _median_s(bench: dict) -> float:
    """The figure that counts: CUDA events on a GPU, pytest-benchmark's median elsewhere."""
    return bench["extra_info"].get("cuda_event_median_s") or bench["stats"]["median"]


def _fmt(x: float | None, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(int(spec.split(".")[0] or 0))  # keeps the columns
    return format(x, spec)


def ops_table(roofline: dict, bench_json: dict | None, device: str, shape: str) -> list[str]:
    import bench_ops  # bench/ is on sys.path when run as bench/gpu_expect.py

    copy_bw = roofline["copy_GB_per_s"] * 1e9
    results = {}
    for b in (bench_json or {}).get("benchmarks", []):
        info = b.get("extra_info", {})
        if info.get("device") == device and info.get("shape") == shape and "op" in info:
            results[(info["op"], info["mode"], info["impl"])] = b
    lines = [f"ops at the {shape} shape on {device}; copy bandwidth {roofline['copy_GB_per_s']:.1f} GB/s "
             f"({roofline['device']}): predicted = bytes moved / copy bandwidth"]
    lines.append(f"{'op':22} {'mode':8} {'MB':>7} {'predicted us':>12}" +
                 (f" {'fused us':>9} {'% copy bw':>9} {'compiled us':>11} {'vs compiled':>11}" if bench_json else ""))
    for op in bench_ops.OPS:
        for mode in ("fwd", "fwd+bwd"):
            _, moved = bench_ops.make_runner(op, "eager", shape, "cpu", mode)  # bytes only: no device needed
            line = f"{op:22} {mode:8} {moved / 1e6:7.2f} {moved / copy_bw * 1e6:12.1f}"
            if bench_json:
                fused, compiled = results.get((op, mode, "fused")), results.get((op, mode, "compiled"))
                f_s = _median_s(fused) if fused else None
                c_s = _median_s(compiled) if compiled else None
                pct = moved / f_s / copy_bw * 100 if f_s else None
                ratio = c_s / f_s if f_s and c_s else None
                line += (f" {_fmt(f_s and f_s * 1e6, '9.1f')} {_fmt(pct, '9.1f')} "
                         f"{_fmt(c_s and c_s * 1e6, '11.1f')} {_fmt(ratio, '11.2f')}")
            lines.append(line)
    if bench_json and not results:
        lines.append(f"no {device} {shape} op results in the JSON")
    return lines


def steps_table(roofline: dict, bench_json: dict | None, device: str, case: str) -> list[str]:
    mm_rate = roofline["bf16_matmul_TFLOP_per_s"] * 1e12
    results = {}
    for b in (bench_json or {}).get("benchmarks", []):
        info = b.get("extra_info", {})
        if info.get("device") == device and info.get("case") == case:
            results[info["impl"]] = info
    lines = [f"train steps, case {case} on {device}; bf16 matmul rate {roofline['bf16_matmul_TFLOP_per_s']:.1f} "
             f"TFLOP/s ({roofline['device']}): predicted ceiling = that rate / the step's matmul FLOPs per sample"]
    if not bench_json:
        import bench_step  # imports the model code: only when asked

        size, task, batch = bench_step.CASES[case][:3]
        flops = bench_step.step_matmul_flops(case, "unfused", "cpu" if device != "cuda" else device)
        lines.append(f"  {flops / batch / 1e9:.2f} GFLOP/sample (matmuls, counted on one eager step): at most "
                     f"{mm_rate / (flops / batch):.1f} samples/s at 100% of the measured matmul rate")
        return lines
    if not results:
        return lines + [f"no {device} {case} step results in the JSON"]
    lines.append(f"{'variant':22} {'samples/s':>10} {'ceiling':>9} {'MFU meas.':>9} {'MFU sheet':>9} "
                 f"{'vs unfused':>10} {'vs compiled':>11} {'vs prior':>9}")
    bf16 = any(v.endswith("-bf16") for v in results)
    refs = [r + ("-bf16" if bf16 else "") for r in ("unfused", "compiled")] + ["prior"]
    for variant, info in results.items():
        ceiling = mm_rate / (info["gflop_per_sample"] * 1e9)
        mfu = info["gflop_per_s"] * 1e9 / mm_rate  # the best round's matmul FLOP/s over the measured rate
        ratios = [info["best_samples_per_s"] / results[r]["best_samples_per_s"] if r in results else None
                  for r in refs]
        sheet = info.get("mfu")  # against the datasheet peak, where bench_step knows the device
        lines.append(f"{variant:22} {info['samples_per_s']:10.1f} {ceiling:9.1f} {mfu * 100:8.1f}% "
                     f"{_fmt(sheet and sheet * 100, '8.1f')}{'%' if sheet else ' '} "
                     f"{_fmt(ratios[0], '10.2f')} {_fmt(ratios[1], '11.2f')} {_fmt(ratios[2], '9.2f')}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["ops", "steps"])
    parser.add_argument("--roofline", required=True, help="bench/gpu_roofline.py's JSON")
    parser.add_argument("--bench", default=None, help="pytest-benchmark JSON of the stage (omit: prediction only)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="base", help="ops: bench_ops.SHAPES key")
    parser.add_argument("--case", default="base-eva_to_clip-256", help="steps: bench_step.CASES key")
    args = parser.parse_args(argv)
    roofline = _load(args.roofline)
    bench_json = _load(args.bench) if args.bench else None
    if args.what == "ops":
        lines = ops_table(roofline, bench_json, args.device, args.shape)
    else:
        lines = steps_table(roofline, bench_json, args.device, args.case)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
