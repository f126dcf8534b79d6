"""Using a trained model (docs/architecture.md §3.13): `FeatureGenerator.generate` samples/s for the tiny model on
the demo task and the small model on the real eva_to_clip shapes (condition [256, 4096] -> target [257, 1024]),
Euler and Heun, fused ops vs their eager references ("unfused"); and the export/load round trip
(`save_pretrained` then `from_pretrained`) of both sizes.

    pytest bench/bench_generate.py --benchmark-group-by=group -s

Weights are the models' initialisation (speed does not depend on their values). fp32 on CPU, the default
dtype on CUDA (bf16). samples/s counts whole samples: `steps` model calls each (Heun: 2·steps).
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import sync

from blip3o_fast.config import load_config
from blip3o_fast.inference import FeatureGenerator
from blip3o_fast.inference.pretrained import Provenance
from blip3o_fast.model import DiT

# case -> (model size, task, batch, sampler steps, rounds)
CASES = {"tiny-demo": ("tiny", "demo", 64, 10, 3), "small-eva_to_clip": ("small", "eva_to_clip", 2, 2, 1)}
RESULTS: dict[tuple, dict] = {}


def make_generator(case: str, fused: bool, device: str) -> FeatureGenerator:
    size, task_name = CASES[case][:2]
    cfg = load_config("demo", [])
    cfg.model = load_config(f"model/{size}", [f"model.fused_ops={fused}"]).model
    cfg.task = load_config(f"task/{task_name}").task
    torch.manual_seed(0)
    state = DiT(cfg.model, cfg.task).state_dict()
    return FeatureGenerator(cfg, state, None, Provenance("ema", source=f"bench {case}"), device=device)


@pytest.mark.parametrize("impl", ["fused", "unfused"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("case", list(CASES))
def test_generate(benchmark, case, sampler, impl, device):
    gen = make_generator(case, impl == "fused", device)
    batch, steps, rounds = CASES[case][2:]
    cond = torch.randn(batch, gen.task.cond_tokens, gen.task.cond_dim)
    run = lambda: (gen.generate(cond, steps=steps, sampler=sampler, batch_size=batch), sync(device))
    benchmark.group = f"generate {case} {sampler} {device}"
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    info = dict(case=case, impl=impl, sampler=sampler, steps=steps, device=device, batch=batch,
                samples_per_s=batch / median, model_calls=steps * (2 if sampler == "heun" else 1),
                params=gen.num_parameters(), threads=torch.get_num_threads())
    benchmark.extra_info.update(info)
    RESULTS[(case, sampler, impl)] = info


@pytest.mark.parametrize("case", list(CASES))
def test_export_load_round_trip(benchmark, case, tmp_path):
    gen = make_generator(case, True, "cpu")

    def round_trip():
        gen.save_pretrained(tmp_path / "export")
        return FeatureGenerator.from_pretrained(tmp_path / "export", device="cpu")

    benchmark.group = f"export+load {case}"
    benchmark.pedantic(round_trip, rounds=2, iterations=1, warmup_rounds=0)
    size = (tmp_path / "export" / "model.safetensors").stat().st_size
    benchmark.extra_info.update(case=case, impl="fused", params=gen.num_parameters(), model_mb=size / 2**20,
                                mb_per_s=size / 2**20 / benchmark.stats.stats.median)


def test_report(capsys):
    """samples/s per case and sampler, and fused over unfused (runs last in this file)."""
    lines = [f"{'case':18} {'sampler':7} {'impl':8} {'device':6} {'samples/s':>10} {'vs unfused':>10}"]
    for (case, sampler, impl), info in sorted(RESULTS.items()):
        base = RESULTS.get((case, sampler, "unfused"))
        ratio = info["samples_per_s"] / base["samples_per_s"] if base else float("nan")
        lines.append(f"{case:18} {sampler:7} {impl:8} {info['device']:6} {info['samples_per_s']:10.2f} {ratio:10.2f}")
    with capsys.disabled():
        print(f"\n{time.strftime('%H:%M:%S')} generation\n" + "\n".join(lines))
