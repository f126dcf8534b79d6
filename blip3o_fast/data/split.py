"""The held-out split of the producers (`extract`, `data convert-chunks` with `--eval-fraction`): a sample
goes to the eval split when a stable hash of its key falls below the fraction, so the same key lands in the
same split on every machine, rank, rerun and input order (Python's hash() is salted per process)."""

from __future__ import annotations

import hashlib

from .format import DataError


def check_fraction(fraction: float) -> float:
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--eval-fraction {fraction} must be at least 0 and below 1 (e.g. 0.01 holds out 1%)")
    return fraction


def held_out(key: str, fraction: float) -> bool:
    """Whether `key` belongs to the eval split: the first 8 bytes of sha256(key), as a fraction of 2^64."""
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(str(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2.0**64
