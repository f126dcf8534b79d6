"""Logging that a batch job's log file can read (docs/architecture.md §3.10).

`configure_logging()` runs first in every command: each line carries time, rank and level, so the merged
output of many ranks (a SLURM `.out` file) says which rank warned. Rank 0 logs `blip3o_fast` INFO lines
(checkpoints, resumes); the other ranks only warnings and errors. Python warnings (`warnings.warn`, also
from torch and DeepSpeed) go through the same handler, rank-tagged. A process that already has handlers
on the root logger (pytest, an embedding application) keeps its own setup.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s rank %(rank)s %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    """Stamps each record with this process's rank, read when the record is made (srun tasks and lone
    processes learn theirs after logging is configured)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = os.environ.get("RANK", "0")
        return True


def configure_logging(stream=None) -> bool:
    """Sets up the root handler; returns False where one was already there (nothing changed)."""
    root = logging.getLogger()
    if root.handlers:
        return False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    main = os.environ.get("RANK", "0") == "0"
    logging.getLogger("blip3o_fast").setLevel(logging.INFO if main else logging.WARNING)
    logging.captureWarnings(True)
    return True
