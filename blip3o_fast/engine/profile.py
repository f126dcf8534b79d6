"""A profiler window (docs/architecture.md §3.10): `train.profile=true` records steps
`train.profile_steps = [start, end)` with torch.profiler and writes, per rank, into `<run>/profile/`:

  trace-rank<R>.json            Chrome trace (CPU ops, and CUDA kernels on GPU): open it in https://ui.perfetto.dev
                                or chrome://tracing
  memory-rank<R>.pickle         on GPU, the CUDA caching allocator's snapshot: drag it onto https://pytorch.org/memory_viz
  memory-timeline-rank<R>.html  on CPU, the profiler's memory timeline by category: open it in a browser

The window starts after the first steps (warm-up, compile) and is short: a trace of many steps is large.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger("blip3o_fast.profile")


class StepProfiler:
    def __init__(self, enabled: bool, window: tuple[int, int], run_dir: Path, rank: int, device: torch.device):
        self.start, self.end = window if enabled else (-1, -1)
        self.folder, self.rank, self.device = Path(run_dir) / "profile", rank, device
        self.prof = None

    def before_step(self, step: int) -> None:
        """`step`: the number of steps done so far (0 before the first)."""
        if step != self.start:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=True)
        self.prof.__enter__()

    def after_step(self, step: int) -> None:
        """`step`: the number of steps done, this one included."""
        if self.prof is None or step != self.end:
            return
        self.prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"trace-rank{self.rank}.json"
        self.prof.export_chrome_trace(str(trace))
        if self.device.type == "cuda":
            memory = self.folder / f"memory-rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(memory))
            torch.cuda.memory._record_memory_history(enabled=None)
        else:
            memory = self.folder / f"memory-timeline-rank{self.rank}.html"
            self.prof.export_memory_timeline(str(memory), device="cpu")
        self.prof = None
        log.info("profile of steps %d-%d: %s, %s", self.start + 1, self.end, trace, memory)

    def close(self) -> None:
        """A run that ends inside the window still stops the profiler (nothing is written)."""
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None
