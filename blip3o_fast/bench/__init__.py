"""Benchmark results: the report table and history plot of `blip3o-fast bench report`."""
