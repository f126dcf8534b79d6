"""The card's own ceilings, measured in the same command as the kernels they judge (issue 8): device copy
bandwidth (a large tensor copied on the GPU) and the dense bf16 matmul rate, both timed with CUDA events.

    python bench/gpu_roofline.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from conftest import cuda_event_median_s  # bench/ is on the path when run as bench/gpu_roofline.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_roofline: no CUDA device")
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB: far beyond L2
    dst = torch.empty_like(src)
    copy_s = cuda_event_median_s(lambda: dst.copy_(src), rounds=20, warmup=3)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_s = cuda_event_median_s(lambda: a @ b, rounds=20, warmup=3)
    figures = {
        "device": torch.cuda.get_device_name(),
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


if __name__ == "__main__":
    main()
