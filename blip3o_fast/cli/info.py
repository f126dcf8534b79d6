"""`blip3o-fast info`: what the extension was built against and what is running now."""

from __future__ import annotations

import json

from .. import __version__


def collect() -> dict:
    import torch

    from ..ops import _extension

    info = {
        "blip3o_fast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "build": _extension.build_info(),
    }
    try:
        _extension.load()
        info["extension"] = f"loaded, {_extension.build_kind()}"  # which build: CPU-only builds happen silently
        info["kernels"] = {dev: _extension.has_kernel("rope3d", dev) for dev in ("cpu", "cuda")}
    except _extension.ExtensionError as e:
        info["extension"] = str(e)
    try:
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    except ImportError:
        info["flash_attn"] = None
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    build = info.pop("build") or {}
    for key, value in info.items():
        print(f"{key:16s} {value}")
    print("build:" if build else "build:           none recorded (the extension is not built)")
    for key, value in build.items():
        print(f"  {key:14s} {value}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("info", help="show the build of the compiled extension and the runtime")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)
