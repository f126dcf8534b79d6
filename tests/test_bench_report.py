"""`blip3o-fast bench report`: speed-ups from pytest-benchmark JSON, CUDA-event timings preferred, the
history plot, and one-line errors."""

from __future__ import annotations

import json

import pytest

from blip3o_fast.bench import report as bench_report
from blip3o_fast.cli import main
from blip3o_fast.errors import UserError


def bench(group, impl, median_s, **extra):
    return {"group": group, "name": f"test[{impl}]", "stats": {"median": median_s, "iqr": 0.0},
            "extra_info": {"impl": impl, **extra}}


def write_run(folder, name, when, benchmarks):
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"datetime": when, "benchmarks": benchmarks,
                                "machine_info": {"blip3o_fast": {"device": "cpu", "torch": "x", "commit": "abc"}}}))
    return path


def test_speedups_from_medians_rates_and_cuda_events(tmp_path):
    path = write_run(tmp_path, "r1", "2026-01-01", [
        bench("rope fwd", "fused", 0.001), bench("rope fwd", "eager", 0.004), bench("rope fwd", "compiled", 0.002),
        # on a GPU the CUDA-event median wins over the wall-clock one
        bench("swiglu fwd cuda", "fused", 0.010, cuda_event_median_s=0.001),
        bench("swiglu fwd cuda", "eager", 0.012, cuda_event_median_s=0.003),
        # samples/s where every impl has one (end-to-end runs)
        bench("step", "fused", 9.0, samples_per_s=300.0), bench("step", "unfused", 1.0, samples_per_s=100.0),
        bench("zero", "zero0", 1.0, samples_per_s=200.0), bench("zero", "zero2", 1.0, samples_per_s=180.0),
    ])
    table = {e["group"]: e for e in bench_report.speedups(bench_report.load_run(path))}
    assert table["rope fwd"]["speedup"] == pytest.approx({"compiled": 2.0, "eager": 4.0})
    assert table["swiglu fwd cuda"]["speedup"] == pytest.approx({"eager": 3.0})
    assert table["step"]["speedup"] == pytest.approx({"unfused": 3.0})
    assert table["zero"]["primary"] == "zero0" and table["zero"]["speedup"] == pytest.approx({"zero2": 200 / 180})
    text = bench_report.format_table(bench_report.load_run(path))
    assert "rope fwd" in text and "fused vs   compiled:2.00x  eager:4.00x" in text and "commit=abc" in text


def test_report_command_prints_the_newest_run_and_plots_the_history(tmp_path, capsys):
    write_run(tmp_path, "old", "2026-01-01", [bench("g", "fused", 0.002), bench("g", "eager", 0.004)])
    write_run(tmp_path, "new", "2026-01-02", [bench("g", "fused", 0.001), bench("g", "eager", 0.004)])
    plot = tmp_path / "history.png"
    assert main(["bench", "report", "--results", str(tmp_path), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "new.json" in out and "eager:4.00x" in out and "history of 2 run(s)" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_or_bad_results_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="run `make bench` first"):
        bench_report.load_history(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no benchmark results in"):
        bench_report.load_history(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="is not a pytest-benchmark JSON file"):
        bench_report.load_run(bad)
