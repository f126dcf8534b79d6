"""The card's own ceilings, measured in the same command as the kernels they judge (issue 8): device copy
bandwidth (a large tensor copied on the GPU) and the dense bf16 matmul rate, both timed with CUDA events.

    python bench/gpu_roofline.py [--json OUT.json] [--smoke]

--smoke runs the same code on the CPU at small sizes (`make gpu-check-dry`): its figures are the CPU's,
only there so the later stages' read of the JSON is rehearsed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from conftest import cuda_event_median_s  # bench/ is on the path when run as bench/gpu_roofline.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--smoke", action="store_true", help="CPU, small sizes: rehearses the script only")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_roofline: no CUDA device")
    device = "cpu" if args.smoke else "cuda"
    timer = cpu_median_s if args.smoke else cuda_event_median_s
    src = torch.empty(2**24 if args.smoke else 2**30, dtype=torch.uint8, device=device)  # 1 GiB: far beyond L2
    dst = torch.empty_like(src)
    copy_s = timer(lambda: dst.copy_(src), rounds=20, warmup=3)
    n = 256 if args.smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_s = timer(lambda: a @ b, rounds=20, warmup=3)
    figures = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "copy_GB_per_s": 2 * src.numel() / copy_s / 1e9,  # read + write
        "bf16_matmul_TFLOP_per_s": 2 * n**3 / mm_s / 1e12,
    }
    for key, value in figures.items():
        print(f"{key:26s} {value:.1f}" if isinstance(value, float) else f"{key:26s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


def cpu_median_s(run, rounds: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
