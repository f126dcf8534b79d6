"""Elastic resume of the training streams: another world size or stream count (docs/architecture.md §3.9.4).

Each saved stream's reading order within its pass is a pure function of (seed, epoch, rank, worker), so
its position says exactly which of its samples it has consumed in that pass. From every saved rank's
state, `rest_of_epoch` computes the samples still unread in each stream's current pass: a per-shard
bitmap of positions (`left`). The new streams first read their new share of those (a *rest* pass, the
same shard assignment rule `stream_shards` over the new stream count), then epoch `next_epoch` and on as
usual. So within the epoch of the checkpoint no sample is lost or read twice, whatever the old and new
layouts; a rest pass that is itself interrupted is mapped again the same way.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import numpy as np

from .format import DataError
from .samples import SkipStats


def encode_left(left: dict[int, np.ndarray]) -> dict[str, str]:
    """Compact JSON form: shard -> base64 of the packed bitmap (shards with nothing left are dropped)."""
    return {str(i): base64.b64encode(np.packbits(mask).tobytes()).decode() for i, mask in sorted(left.items())
            if mask.any()}


def decode_left(record: dict[str, str], shard_samples: list[int]) -> dict[int, np.ndarray]:
    out = {}
    for key, text in record.items():
        i = int(key)
        bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
        out[i] = bits[:shard_samples[i]].astype(bool)
    return out


def check_states(states: list[dict], here: dict, path) -> None:
    """The saved states must come from this split, seed, shard list and state version."""
    for state in states:
        differ = [f"{k} {state.get(k)!r} -> {v!r}" for k, v in here.items() if state.get(k) != v]
        if differ:
            raise DataError(f"the data-stream state of saved rank {state.get('rank')} does not fit {path} "
                            f"({', '.join(differ)}): resume with the dataset and train.seed it was saved with")


def rest_of_epoch(shard_samples: list[int], states: list[dict],
                  saved_streams: Callable[[dict], object]) -> tuple[int, dict[int, np.ndarray]]:
    """(next_epoch, left) from every saved rank's loader state: the positions each saved stream had not yet
    consumed in its current pass, and the epoch that follows the latest of those passes. `saved_streams(state)`
    rebuilds that rank's streams (reader.TrainShards: `streams`, `plan`, `block`)."""
    left = {i: np.zeros(n, dtype=bool) for i, n in enumerate(shard_samples)}
    next_epoch = 0
    for state in states:
        src = saved_streams(state)
        src.left = decode_left(state.get("left", {}), shard_samples)
        for logical in range(src.streams):
            epoch, k, offset, *rest = state["positions"].get(str(logical), [0, 0, 0])
            rest = bool(rest and rest[0])
            blocks = src.plan(logical, epoch, rest)
            for b in range(k, len(blocks)):
                items = src.block(logical, epoch, rest, b, blocks[b], None)
                for shard_i, position, _ in items[offset if b == k else 0:]:
                    left[shard_i][position] = True
            next_epoch = max(next_epoch, epoch if rest else epoch + 1)
    return next_epoch, {i: mask for i, mask in left.items() if mask.any()}


def carried_stats(states: list[dict], rank: int, world_size: int) -> list[dict]:
    """The saved ranks' skip counts this rank carries on: saved rank q's go to rank q % world_size, so
    the new ranks together count each once."""
    out: list[dict] = []
    for state in states:
        if int(state["rank"]) % world_size == rank:
            out += list(state.get("carried", [])) + list(state["stats"].values())
    return out


def describe(states: list[dict], left: dict[int, np.ndarray], next_epoch: int) -> str:
    total = sum(int(m.sum()) for m in left.values())
    skipped = SkipStats.total(carried_stats(states, 0, 1))["skipped_samples"]
    return (f"{len(states)} saved rank(s) x {states[0]['streams']} stream(s); {total} sample(s) left in the current "
            f"epoch, then epoch {next_epoch}" + (f" ({skipped} skipped so far)" if skipped else ""))
