"""One training step (forward, backward, AdamW) of our DiT: fused ops vs their eager references
("unfused") vs torch.compile of the unfused model ("compiled") vs torch.compile around the fused ops
("fused+compiled", what train.compile=true runs), beside the prior projects' style of model at the
same size ("prior", bench/baselines/prior_dit.py). Attention backends: every variant runs `auto` (flash-attn
on a GPU that has it, else SDPA) except "fused/math-attention", the plain softmax(QK^T)V.

"-bf16" variants run in bfloat16 (ours: bf16 weights and activations, as DeepSpeed's bf16 mode runs the
model; the prior: bf16 autocast over fp32 weights, as it ran fp16 autocast on GPU). On a CPU with AMX
this is where the matmuls get fast; fp32 against fp32 and bf16 against bf16 are the like-for-like ratios.

Cases: the tiny model on the demo task (the CPU demo's workload) and the small model on the real
eva_to_clip shapes (condition [256, 4096] -> target [257, 1024]), where the prior style's per-block
projection of the 4096-d condition shows. Our variants use torch's fused AdamW where this torch has
it for the device (as the trainer does); the prior style uses the default AdamW, as it did.

    pytest bench/bench_step.py --benchmark-group-by=group -s

Reports samples/s, tokens/s, peak memory and the matmul FLOPs of a step (counted by torch's
FlopCounterMode on the same step with SDPA's math kernel, so attention counts too; elementwise work does
not) in `extra_info`, and prints the speed ratios and achieved GFLOP/s at the end: where a variant is
bound by its matmuls, its speed-up over another cannot exceed their FLOP ratio.
Peak memory is parameters, gradients and AdamW state plus the peak of what one step allocates on top
(CPU: the profiler's allocation events; CUDA: the allocator's peak). fp32 throughout on CPU.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from baselines.prior_dit import PriorStyleDiT, prior_training_loss
from conftest import COLLECT_CUDA, cuda_event_median_s, sync
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from blip3o_fast.config import FlowConfig, TrainConfig, load_config
from blip3o_fast.engine.metrics import peak_flops, train_flops_per_sample
from blip3o_fast.engine.optim import make_adamw
from blip3o_fast.model import DiT, flow

CONFIGS = Path(__file__).resolve().parent.parent / "blip3o_fast" / "configs"
# case -> (model size, task, batch, rounds, variants)
CASES = {
    "tiny-demo": ("tiny", "demo", 32, 10, ["fused", "unfused", "compiled", "fused+compiled", "fused/math-attention",
                                           "prior", "fused-bf16", "prior-bf16"]),
    "small-eva_to_clip": ("small", "eva_to_clip", 2, 3, ["fused", "unfused", "fused/math-attention", "prior",
                                                         "fused-bf16", "prior-bf16"]),
}
# issue 8's end-to-end case, GPU only: the base model on eva_to_clip with 256 target tokens, bf16 (the prior
# style as it ran: fp16 autocast), batch 64 already on the device
if torch.cuda.is_available() or COLLECT_CUDA:
    CASES["base-eva_to_clip-256"] = ("base", "eva_to_clip", 64, 10, ["fused-bf16", "unfused-bf16", "compiled-bf16",
                                                                     "fused+compiled-bf16", "prior"])
CUDA_ONLY = {"base-eva_to_clip-256"}
TASK_OVERRIDES = {"base-eva_to_clip-256": ["task.target_cls=false"]}
VARIANTS = ["fused", "unfused", "compiled", "fused+compiled", "fused/math-attention", "prior", "fused-bf16",
            "unfused-bf16", "compiled-bf16", "fused+compiled-bf16", "prior-bf16"]
RESULTS: dict[tuple[str, str], dict] = {}


def make_step(case: str, variant: str, device: str):
    """A closure running one optimizer step, its model and optimizer."""
    size, task_name, batch = CASES[case][:3]
    bf16 = variant.endswith("-bf16")
    variant = variant.removesuffix("-bf16")
    fused = variant in ("fused", "fused+compiled", "fused/math-attention")
    attention = "math" if variant == "fused/math-attention" else "auto"
    model_cfg = load_config(CONFIGS / "model" / f"{size}.yaml",
                            [f"model.fused_ops={fused}", f"model.attention={attention}"]).model
    task = load_config(CONFIGS / "task" / f"{task_name}.yaml", TASK_OVERRIDES.get(case, [])).task
    torch.manual_seed(0)
    if variant == "prior":
        model = PriorStyleDiT(model_cfg.hidden_size, model_cfg.depth, model_cfg.num_heads, task.cond_dim,
                              task.target_dim, task.target_tokens, model_cfg.mlp_ratio).to(device)
        model.task = task
        model.num_parameters = lambda: sum(p.numel() for p in model.parameters())
    else:
        model = DiT(model_cfg, task).to(device, torch.bfloat16 if bf16 else torch.float32)
    if variant.endswith("compiled"):
        torch._dynamo.reset()  # a fresh cache per variant: no recompile limit carried over
    net = torch.compile(model, dynamic=False) if variant.endswith("compiled") else model
    if variant == "prior":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        opt = make_adamw(model, TrainConfig(lr=1e-4), torch.device(device))
    gen = torch.Generator(device).manual_seed(0)
    data_dtype = torch.bfloat16 if bf16 and variant != "prior" else torch.float32
    target = torch.randn(batch, task.target_tokens, task.target_dim, device=device).to(data_dtype)
    cond = torch.randn(batch, task.cond_tokens, task.cond_dim, device=device).to(data_dtype)
    flow_cfg = FlowConfig()

    scaler = torch.amp.GradScaler("cuda") if variant == "prior" and device == "cuda" and not bf16 else None
    autocast = torch.bfloat16 if bf16 else torch.float16

    def step():
        if variant == "prior":  # as the prior projects ran: fp16 autocast and a loss scaler on GPU
            with torch.autocast(device, dtype=autocast, enabled=scaler is not None or bf16):
                loss = prior_training_loss(net, target, cond, gen)
        else:
            loss, _ = flow.training_loss(net, target, cond, flow_cfg, gen)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sync(device)

    return step, model, opt


def static_bytes(model, opt) -> int:
    """Bytes that live across steps: parameters, gradients and optimizer state."""
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_step_bytes(step, device: str) -> int | None:
    """Peak of the bytes allocated during one step above what was live at its start.

    On CPU, from the profiler's allocation events; the previous step is profiled too, as the
    profiler only sees the frees of blocks it saw allocated (step n's gradients die in step n + 1)."""
    if device == "cuda":
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    try:
        for _ in range(2):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
        # experimental_event_tree is semi-private, but it is the only allocation trace on CPU
        stack, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))  # frees are negative
            stack.extend(node.children)
        live = peak = 0
        for _, size in sorted(events):
            live += size
            peak = max(peak, live)
        return peak
    except Exception:  # the profiler internals move between torch versions: no number rather than a failure
        return None


FLOPS: dict[tuple[str, str], int] = {}


def step_matmul_flops(case: str, variant: str, device: str) -> int:
    """Matmul FLOPs of one training step (batch of the case) of the variant's model family, counted on an
    eager step with SDPA's math kernel (its fused CPU/GPU kernels are invisible to the counter)."""
    family = "prior" if variant.startswith("prior") else "ours"
    if (case, family) not in FLOPS:
        step, _, _ = make_step(case, "prior" if family == "prior" else "unfused", device)
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            step()
        FLOPS[(case, family)] = counter.get_total_flops()
    return FLOPS[(case, family)]


@pytest.mark.parametrize("case,variant", [(c, v) for c, spec in CASES.items() for v in spec[4]])
def test_train_step(benchmark, case, variant, device):
    if case in CUDA_ONLY and device != "cuda":
        pytest.skip(f"{case} is a GPU case")
    benchmark.group = f"train step {case} {device}"
    step, model, opt = make_step(case, variant, device)
    start = time.perf_counter()
    for _ in range(2):  # warm-up: compilation, allocator, optimizer state
        step()
    warmup_s = time.perf_counter() - start
    batch, rounds = CASES[case][2:4]
    rounds = int(os.environ.get("BENCH_STEP_ROUNDS", rounds))  # `make gpu-check-dry` smokes with fewer
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = benchmark.stats.stats
    median, best = stats.median, stats.min
    if device == "cuda":  # GPU time between CUDA events around the step (its host work included, as it stalls the GPU)
        median = best = cuda_event_median_s(step, rounds=max(rounds, 10))
    step_peak = peak_step_bytes(step, device)
    info = dict(case=case, impl=variant, device=device, batch=batch, params=model.num_parameters(),
                samples_per_s=batch / median, best_samples_per_s=batch / best,
                tokens_per_s=batch * model.task.target_tokens / median,
                peak_mb=(static_bytes(model, opt) + step_peak) / 2**20 if step_peak is not None else None,
                step_peak_mb=step_peak / 2**20 if step_peak is not None else None,
                warmup_s=warmup_s, threads=torch.get_num_threads(),
                gflop_per_sample=step_matmul_flops(case, variant, device) / batch / 1e9)
    info["gflop_per_s"] = info["gflop_per_sample"] * info["best_samples_per_s"]
    if not variant.startswith("prior"):
        peak = peak_flops(torch.device(device))
        info["mfu"] = info["samples_per_s"] * train_flops_per_sample(model) / peak if peak else None
    if device == "cuda":
        info["cuda_event_median_s"] = median
    benchmark.extra_info.update(info)
    RESULTS[(case, variant)] = info


def test_report_ratios(capsys):
    """Prints samples/s, peak memory, matmul GFLOP and the speed ratios against unfused, the prior style at
    the same precision and the prior style as it ran in fp32 on CPU (runs last in this file).

    Ratios use each variant's best round: on a shared machine other load only ever adds time."""
    lines = [f"{'case':18} {'variant':20} {'samples/s':>10} {'best':>8} {'vs unfused':>10} {'vs prior':>9} "
             f"{'vs prior fp32':>13} {'GFLOP/sample':>12} {'GFLOP/s':>8} {'peak MB':>8} {'step MB':>8}"]
    for (case, variant), info in sorted(RESULTS.items(), key=lambda kv: (kv[0][0], VARIANTS.index(kv[0][1]))):
        ratios = []
        bf16 = variant.endswith("-bf16")
        unfused = "unfused-bf16" if bf16 and (case, "unfused-bf16") in RESULTS else "unfused"
        same_precision_prior = "prior-bf16" if bf16 and (case, "prior-bf16") in RESULTS else "prior"
        for ref in (unfused, same_precision_prior, "prior"):
            base = RESULTS.get((case, ref))
            ratios.append(info["best_samples_per_s"] / base["best_samples_per_s"] if base else float("nan"))
        mb = [f"{info[k]:.1f}" if info[k] is not None else "-" for k in ("peak_mb", "step_peak_mb")]
        lines.append(f"{case:18} {variant:20} {info['samples_per_s']:10.1f} {info['best_samples_per_s']:8.1f} "
                     f"{ratios[0]:10.2f} {ratios[1]:9.2f} {ratios[2]:13.2f} {info['gflop_per_sample']:12.3f} "
                     f"{info['gflop_per_s']:8.1f} {mb[0]:>8} {mb[1]:>8}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
