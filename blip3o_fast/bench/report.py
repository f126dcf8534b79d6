"""Reads the benchmark history under bench/results/ (pytest-benchmark JSON files), prints the latest
run as a table of medians and speed-ups, and plots the history.

Every benchmark records an `impl` in `extra_info` (fused, eager, compiled, unfused, prior, zero0, ...):
within a group, the speed-up of the primary impl (fused, or zero0 for ZeRO stages) over another is
the ratio of their samples/s when every impl records one (end-to-end runs whose wall time includes
start-up), else the ratio of their median times (> 1 means the primary is faster).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

PRIMARY = ("fused", "zero0")  # the impl that speed-ups are measured for, first found


@dataclass
class Run:
    path: Path
    when: str
    machine: dict
    rows: list[dict]  # {group, impl, median_s, iqr_s, extra}


def load_run(path: Path) -> Run:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a pytest-benchmark JSON file ({e})") from None
    rows = []
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        stats = bench["stats"]
        rows.append({
            "group": bench.get("group") or bench["name"],
            "impl": extra.get("impl", bench["name"]),
            # GPU kernel timings: CUDA events around the kernels where the benchmark recorded them
            "median_s": extra.get("cuda_event_median_s", stats["median"]),
            "iqr_s": stats.get("iqr", 0.0),
            "extra": extra,
        })
    return Run(path, data.get("datetime", ""), data.get("machine_info", {}), rows)


def load_history(results: Path) -> list[Run]:
    if not results.is_dir():
        raise UserError(f"no benchmark results folder {results}: run `make bench` first")
    runs = [load_run(p) for p in sorted(results.glob("*.json"))]
    runs = [r for r in runs if r.rows]
    if not runs:
        raise UserError(f"no benchmark results in {results}: run `make bench` first")
    return sorted(runs, key=lambda r: r.when)


def speedups(run: Run) -> list[dict]:
    """Per group: every impl's median (ms) and samples/s, and the primary impl's speed-up over the others."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in run.rows:
        groups[row["group"]][row["impl"]] = row
    table = []
    for group, impls in sorted(groups.items()):
        entry = {"group": group, "medians_ms": {k: v["median_s"] * 1e3 for k, v in sorted(impls.items())}}
        rates = {k: v["extra"]["samples_per_s"] for k, v in impls.items() if "samples_per_s" in v["extra"]}
        if rates:
            entry["samples_per_s"] = dict(sorted(rates.items()))
        bandwidth = {k: v["extra"]["gb_per_s"] for k, v in impls.items() if "gb_per_s" in v["extra"]}
        if bandwidth:
            entry["gb_per_s"] = dict(sorted(bandwidth.items()))
        primary = next((p for p in PRIMARY if p in impls), None)
        if primary is not None:
            if len(rates) == len(impls):
                entry["speedup"] = {k: rates[primary] / r for k, r in sorted(rates.items()) if k != primary}
            else:
                base = impls[primary]["median_s"]
                entry["speedup"] = {k: v["median_s"] / base for k, v in sorted(impls.items()) if k != primary}
            entry["primary"] = primary
        table.append(entry)
    return table


def format_table(run: Run) -> str:
    info = run.machine.get("blip3o_fast", {})
    lines = [f"{run.path.name}: {run.when}  device={info.get('device', '?')}  torch={info.get('torch', '?')}  "
             f"threads={info.get('threads', '?')}  commit={info.get('commit', '?')}"]
    for entry in speedups(run):
        lines.append(f"{entry['group']}")
        medians = "  ".join(f"{k}={v:.3g}" for k, v in entry["medians_ms"].items())
        lines.append(f"    median ms   {medians}")
        if "samples_per_s" in entry:
            rates = "  ".join(f"{k}={v:.1f}" for k, v in entry["samples_per_s"].items())
            lines.append(f"    samples/s   {rates}")
        if "gb_per_s" in entry:
            lines.append("    GB/s        " + "  ".join(f"{k}={v:.1f}" for k, v in entry["gb_per_s"].items()))
        if entry.get("speedup"):
            ups = "  ".join(f"{k}:{v:.2f}x" for k, v in entry["speedup"].items())
            lines.append(f"    {entry['primary']} vs   {ups}")
    return "\n".join(lines)


def plot_history(runs: list[Run], out: Path) -> Path:
    """Fused median per group over the runs (log scale), one line per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for i, run in enumerate(runs):
        for entry in speedups(run):
            primary = next((p for p in PRIMARY if p in entry["medians_ms"]), None)
            if primary is not None:
                series[entry["group"]].append((i, entry["medians_ms"][primary]))
    fig, ax = plt.subplots(figsize=(10, 6))
    for group, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=group)
    ax.set_yscale("log")
    ax.set_xticks(range(len(runs)), [r.path.stem for r in runs], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("fused median (ms)")
    ax.set_title("blip3o-fast benchmark history")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
