"""`blip3o-fast bench report`: the latest benchmark table and the history plot."""

from __future__ import annotations

from pathlib import Path


def report(args) -> int:
    from ..bench import report as bench_report

    runs = bench_report.load_history(Path(args.results))
    if args.file:
        latest = bench_report.load_run(Path(args.file))
    else:
        latest = runs[-1]
    print(bench_report.format_table(latest))
    out = bench_report.plot_history(runs, Path(args.plot))
    print(f"history of {len(runs)} run(s) plotted to {out}")
    return 0


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark results")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)
    p = bench_sub.add_parser("report", help="print the latest results table and plot the history")
    p.add_argument("--results", default="bench/results", help="folder of pytest-benchmark JSON files")
    p.add_argument("--file", default=None, help="report this JSON file instead of the newest one")
    p.add_argument("--plot", default="bench/results/history.png", help="where to write the history plot")
    p.set_defaults(run=report)
