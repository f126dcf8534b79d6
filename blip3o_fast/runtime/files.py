"""Writing files so that a reader or a crash never sees half of one: write beside, then rename."""

from __future__ import annotations

import os
from pathlib import Path


def partial_path(path: str | Path) -> Path:
    """Where `path` is written before it is complete (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def commit(partial: str | Path, path: str | Path) -> None:
    """Moves a completely written partial file over `path` in one step (POSIX rename)."""
    os.replace(partial, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    tmp = partial_path(path)
    tmp.write_text(text)
    commit(tmp, path)
