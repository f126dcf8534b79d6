"""Training and evaluation streams over a split's shards (docs/architecture.md §3.9.4).

Training: rank r runs S = max(1, num_workers) streams; stream g = r*S + w of G = world_size*S owns the
shards i with i % G == g (with fewer shards than streams, streams share a shard and keep every m-th
sample of it). Each stream reads its shards epoch after epoch; epoch e's shard order and the sample
order inside each block of shards (about `shuffle_buffer` samples) are permutations drawn from
numpy's generator seeded with (seed, epoch, rank, worker). So every rank and worker sees disjoint
data, and a stream is a pure function of its seed, which is what makes it resumable: the position of
a stream is (epoch, block, offset), and a resumed stream seeks there directly, reading nothing that
was consumed. Batches carry their stream and position; the loader records them as batches are
consumed, so its state after N batches restarts every stream where batch N left it (and rotates the
DataLoader's round-robin so batch N+1 comes from the stream that would have produced it). Another layout
(world size, stream count) continues from every saved rank's state: each new stream first reads a *rest*
pass, its share of what the saved streams had left of their epoch (elastic.py), position (epoch, block, offset, 1).

Evaluation: the split's samples, in manifest order, are cut into contiguous ranges, one per rank and
then one per worker; each is read once, in order, and reported (with any skipped sample) at the end.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import elastic
from .format import DataError, Dataset, ShardInfo
from .samples import BatchBuilder, SkipStats
from .tario import NpyError, index_shard

log = logging.getLogger("blip3o_fast.data")
STATE_VERSION = 1
REST_PASS = 1 << 31  # salts the seeds of a rest-of-epoch pass (elastic resume), apart from every epoch's


def stream_shards(n_shards: int, n_streams: int, g: int) -> list[tuple[int, int, int]]:
    """(shard, stride, offset) triples stream g reads: shard positions p with p % stride == offset."""
    if n_shards >= n_streams:
        return [(i, 1, 0) for i in range(g, n_shards, n_streams)]
    i = g % n_shards
    return [(i, len(range(i, n_streams, n_shards)), g // n_shards)]


def _check_args(dataset: Dataset, split: str, batch_size: int, rank: int, world_size: int,
                num_workers: int) -> list[ShardInfo]:
    if batch_size < 1 or num_workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad loader arguments: batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                         f"num_workers={num_workers}")
    shards = dataset.shards(split)
    if not shards or sum(s.samples for s in shards) == 0:
        raise DataError(f"split {split!r} of {dataset.path} has no samples: write some or choose another split")
    if not any(s.path.is_file() for s in shards):
        raise DataError(f"none of the {len(shards)} shard files of split {split!r} exist in {dataset.path}: "
                        f"copy the shards beside manifest.json")
    return shards


def _batches(source: IterableDataset, num_workers: int, pin_memory: bool):
    """The source's batches, read in the main process or in DataLoader workers (which form whole batches,
    hence batch_size=None), pinned for host-to-GPU copies when asked."""
    if num_workers:
        yield from DataLoader(source, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        return
    for batch in source:
        yield {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()} if pin_memory \
            else batch


class _Files:
    """Open shard files of one block (raw, unbuffered: payload reads go straight into batch rows)."""

    def __init__(self):
        self.open: dict[str, object] = {}

    def get(self, path):
        key = str(path)
        if key not in self.open:
            self.open[key] = open(path, "rb", buffering=0)
        return self.open[key]

    def close(self):
        for f in self.open.values():
            f.close()
        self.open.clear()


def _read(builder: BatchBuilder, files: _Files, shard: ShardInfo, sample, stats: SkipStats) -> int:
    """Adds one sample to the batch being built: 1 when read, 0 when skipped (and counted)."""
    try:
        builder.add(files.get(shard.path), sample)
    except NpyError as e:
        stats.skip_sample(e.reason, f"{shard.file}:{sample.key}")
        return 0
    except OSError as e:
        stats.skip_sample("read error", f"{shard.file}:{sample.key} ({e.strerror or e})")
        return 0
    stats.samples += 1
    return 1


class TrainShards(IterableDataset):
    """The infinite training streams of one rank; DataLoader worker w runs logical stream (w + rotation) % S."""

    def __init__(self, dataset: Dataset, split: str, batch_size: int, seed: int, rank: int, world_size: int,
                 streams: int, shuffle_buffer: int):
        self.dataset, self.split, self.batch_size = dataset, split, batch_size
        self.seed, self.rank, self.world_size, self.streams = seed, rank, world_size, streams
        self.shuffle_buffer = shuffle_buffer
        self.shards = dataset.shards(split)
        self.start: dict[int, list[int]] = {}
        self.start_stats: dict[int, dict] = {}
        self.rotation = 0
        self.left: dict[int, np.ndarray] = {}  # shard -> positions still to read in a `rest` pass (elastic resume)

    def __iter__(self):
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.rotation) % self.streams
        return self.stream(logical, shared=info is not None)

    def _own(self, logical: int) -> tuple[list[tuple[int, int, int]], int]:
        g = self.rank * self.streams + logical
        own = stream_shards(len(self.shards), self.world_size * self.streams, g)
        per_shard = np.mean([self.shards[i].samples / stride for i, stride, _ in own])
        block = 1 if self.shuffle_buffer == 0 else max(1, round(self.shuffle_buffer / max(per_shard, 1.0)))
        return own, block

    def plan(self, logical: int, epoch: int, rest: bool) -> list[list[tuple[int, int, int]]]:
        """The blocks of (shard, stride, offset) a stream reads in one pass: epoch `epoch`, or with `rest`
        the rest of the epoch before it that an elastic resume hands this stream (`self.left`)."""
        own, block_shards = self._own(logical)
        order = np.random.default_rng(self._seed(logical, epoch, rest)).permutation(len(own))
        return [[own[j] for j in order[i:i + block_shards]] for i in range(0, len(order), block_shards)]

    def _seed(self, logical: int, epoch: int, rest: bool, *more: int) -> list[int]:
        return [self.seed, epoch, self.rank, logical, *([REST_PASS] if rest else []), *more]

    def block(self, logical: int, epoch: int, rest: bool, k: int, block, stats: SkipStats | None) -> list[tuple]:
        """Block k of a pass as (shard index, position, sample) in reading order (the shuffle of §3.9.4)."""
        items = self._block_items(block, stats)
        if rest:
            items = [it for it in items if it[0] in self.left and self.left[it[0]][it[1]]]
        perm = (np.random.default_rng(self._seed(logical, epoch, rest, k + 1)).permutation(len(items))
                if self.shuffle_buffer > 0 else range(len(items)))
        return [items[i] for i in perm]

    def stream(self, logical: int, shared: bool = False):
        """Batches of one logical stream, from its start position, forever."""
        stats = SkipStats(self.start_stats.get(logical))
        epoch, start_block, start_offset, *rest = self.start.get(logical, (0, 0, 0))
        rest = bool(rest and rest[0])
        replay = logical in self.start  # the first block was loaded (and its shard errors counted) before
        builder = BatchBuilder(self.dataset, self.batch_size, shared)
        files = _Files()
        while True:
            full_epoch = start_block == 0 and start_offset == 0 and not rest
            read_in_epoch = 0
            blocks = self.plan(logical, epoch, rest)
            for k in range(start_block, len(blocks)):
                items = self.block(logical, epoch, rest, k, blocks[k], None if replay or rest else stats)
                replay = False
                for o in range(start_offset if k == start_block else 0, len(items)):
                    shard_i, _, sample = items[o]
                    read_in_epoch += _read(builder, files, self.shards[shard_i], sample, stats)
                    if builder.full:
                        batch = builder.emit()
                        batch.update(_stream=logical, _pos=[epoch, k, o + 1, *([1] if rest else [])],
                                     _stats=stats.to_dict())
                        yield batch
                files.close()
            if full_epoch and read_in_epoch == 0:
                raise DataError(f"a whole epoch of split {self.split!r} (rank {self.rank}, worker {logical}) had no "
                                f"valid sample ({stats.summary()}): check the shards with `blip3o-fast data inspect "
                                f"{self.dataset.path}`")
            # the rest of an epoch is followed by that epoch's successor (`epoch` is already it)
            epoch, start_block, start_offset, rest = epoch + (0 if rest else 1), 0, 0, False

    def _block_items(self, block: list[tuple[int, int, int]], stats: SkipStats | None) -> list[tuple]:
        """(shard index, position, sample) triples of one block of (shard, stride, offset); a shard shorter than its
        manifest is counted in `stats` (None: not again, when a resumed stream reloads the block it was in)."""
        items = []
        for shard_i, stride, offset in block:
            shard = self.shards[shard_i]
            index = index_shard(shard.path)
            found = len(index.samples)
            if found < shard.samples and stats is not None:
                mine = len(range(offset, shard.samples, stride)) - len(range(offset, found, stride))
                stats.skip_shard(index.error or "shard shorter than its manifest", shard.file)
                if mine:
                    stats.skip_sample("lost with shard", shard.file, mine)
            positions = range(offset, min(found, shard.samples), stride)
            items.extend((shard_i, p, index.samples[p]) for p in positions)
        return items


class TrainLoader:
    """Infinite training batches of one rank, with a state that resumes the exact stream.

    `state_dict()` after consuming N batches, then a fresh loader with `load_state_dict(state)` yields
    exactly batches N+1, N+2, ... of the uninterrupted run (same dataset, world size and num_workers).
    Call `load_state_dict` before iterating; each `iter()` continues from the last consumed batch."""

    def __init__(self, dataset: Dataset, split: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shuffle_buffer: int = 1000, pin_memory: bool = True):
        _check_args(dataset, split, batch_size, rank, world_size, num_workers)
        if not dataset.has_targets:
            raise DataError(f"{dataset.path} holds conditions only (streams.target is null): generate from it with "
                            f"`blip3o-fast generate`; training needs a dataset with targets")
        self.dataset, self.split, self.seed = dataset, split, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.streams = max(1, num_workers)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._source = TrainShards(dataset, split, batch_size, seed, rank, world_size, self.streams, shuffle_buffer)
        self.batches = 0
        self.positions: dict[int, list[int]] = {}
        self.worker_stats: dict[int, dict] = {}
        self.carried: list[dict] = []
        self.left: dict[int, np.ndarray] = {}
        self._logged_skips = 0

    def __iter__(self):
        src = self._source
        src.start, src.start_stats, src.left = dict(self.positions), dict(self.worker_stats), self.left
        src.rotation = self.batches % self.streams
        for batch in _batches(src, self.num_workers, self.pin_memory):
            logical = batch.pop("_stream")
            self.positions[logical] = batch.pop("_pos")
            self.worker_stats[logical] = batch.pop("_stats")
            self.batches += 1
            self._log_skips()
            yield batch

    def _log_skips(self) -> None:
        skipped = sum(s["skipped_samples"] + s["skipped_shards"] for s in self.worker_stats.values())
        if skipped > 2 * self._logged_skips:  # the first skip, then each doubling: visible, not flooding
            self._logged_skips = skipped
            stats = self.stats()
            log.warning("data: skipping bad input in split %r: %s; latest: %s", self.split,
                        SkipStats(stats).summary(), "; ".join(stats["examples"][-2:]))

    def stats(self) -> dict:
        """{samples, skipped_samples, skipped_shards, reasons, examples} over every stream of this rank."""
        return SkipStats.total(list(self.worker_stats.values()) + self.carried)

    def state_dict(self) -> dict:
        """Plain (JSON-able) state of this rank's stream after the batches consumed so far."""
        return {"version": STATE_VERSION, "split": self.split, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "streams": self.streams, "shards": len(self._source.shards),
                "batches": self.batches,
                "positions": {str(k): list(v) for k, v in sorted(self.positions.items())},
                "stats": {str(k): v for k, v in sorted(self.worker_stats.items())}, "carried": list(self.carried),
                **({"left": elastic.encode_left(self.left)} if self.in_rest_pass() else {})}

    def in_rest_pass(self) -> bool:
        """Whether a stream is still reading the rest of the epoch an elastic resume handed over."""
        return any(len(p) > 3 and p[3] for p in self.positions.values())

    def _layout(self) -> dict:
        return {"split": self.split, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "streams": self.streams, "shards": len(self._source.shards)}

    def same_layout(self, state: dict) -> bool:
        """Whether `state` (this rank's saved one) continues exactly here."""
        return all(state.get(k) == v for k, v in self._layout().items())

    def load_elastic(self, states: list[dict]) -> str:
        """Continues the streams of another world size or stream count from every saved rank's state: this
        rank's new streams first read their share of what the saved streams had left of their epoch, then
        the next epoch (elastic.py). Returns a line saying so."""
        src = self._source
        elastic.check_states(states, {"version": STATE_VERSION, "split": self.split, "seed": self.seed,
                                      "shards": len(src.shards)}, self.dataset.path)

        def saved(st: dict) -> TrainShards:
            return TrainShards(self.dataset, self.split, src.batch_size, self.seed, int(st["rank"]),
                               int(st["world_size"]), int(st["streams"]), src.shuffle_buffer)

        next_epoch, self.left = elastic.rest_of_epoch([s.samples for s in src.shards], states, saved)
        self.positions = {w: [next_epoch, 0, 0, 1] for w in range(self.streams)}
        self.worker_stats, self.batches = {}, 0
        self.carried = elastic.carried_stats(states, self.rank, self.world_size)
        return elastic.describe(states, self.left, next_epoch)

    def load_state_dict(self, state: dict) -> None:
        """Continues the stream a state_dict() recorded; a different layout restarts fresh streams."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data stream state has version {state.get('version')!r}, expected {STATE_VERSION}: "
                            f"it was written by another blip3o-fast")
        layout = ("split", "seed", "rank", "world_size", "streams", "shards")
        here = self._layout()
        positions = {int(k): list(v) for k, v in state["positions"].items()}
        stats = {int(k): v for k, v in state["stats"].items()}
        self.batches = int(state["batches"])
        self.carried = list(state.get("carried", []))
        if all(state.get(k) == here[k] for k in layout):
            self.positions, self.worker_stats = positions, stats
            self.left = elastic.decode_left(state.get("left", {}), [s.samples for s in self._source.shards])
            return
        changed = ", ".join(f"{k} {state.get(k)} -> {here[k]}" for k in layout if state.get(k) != here[k])
        # another layout cannot continue the same streams; start new ones past every epoch already read
        next_epoch = 1 + max((p[0] for p in positions.values()), default=-1)
        warnings.warn(f"data stream layout changed ({changed}): starting fresh streams at epoch {next_epoch}",
                      stacklevel=2)
        self.positions = {w: [next_epoch, 0, 0] for w in range(self.streams)}
        self.worker_stats = {}
        self.carried = self.carried + list(stats.values())


class EvalShards(IterableDataset):
    """One pass over this rank's contiguous range of the split, cut again into one range per worker."""

    def __init__(self, dataset: Dataset, split: str, batch_size: int, rank: int, world_size: int, streams: int):
        self.dataset, self.split, self.batch_size = dataset, split, batch_size
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self.shards = dataset.shards(split)
        self.total = sum(s.samples for s in self.shards)

    def range(self, worker: int) -> tuple[int, int]:
        """[lo, hi) of global sample positions (manifest order) read by this rank's worker."""
        lo, hi = self.total * self.rank // self.world_size, self.total * (self.rank + 1) // self.world_size
        n = hi - lo
        return lo + n * worker // self.streams, lo + n * (worker + 1) // self.streams

    def __iter__(self):
        info = get_worker_info()
        return self.stream(info.id if info else 0, shared=info is not None)

    def stream(self, worker: int, shared: bool = False):
        lo, hi = self.range(worker)
        stats = SkipStats()
        builder = BatchBuilder(self.dataset, self.batch_size, shared)
        files = _Files()
        start = 0
        for shard in self.shards:
            a, b = max(lo, start) - start, min(hi, start + shard.samples) - start
            start += shard.samples
            if a >= b:
                continue
            index = index_shard(shard.path)
            found = min(len(index.samples), shard.samples)
            if found < b:
                if found >= a:  # the one range holding the first lost position reports the shard
                    stats.skip_shard(index.error or "shard shorter than its manifest", shard.file)
                stats.skip_sample("lost with shard", shard.file, b - max(a, found))
            for sample in index.samples[a:min(b, found)]:
                _read(builder, files, shard, sample, stats)
                if builder.full:
                    batch = builder.emit()
                    batch.update(_stream=worker, _stats=stats.to_dict())
                    yield batch
            files.close()
        if builder.count:
            batch = builder.emit()
            batch.update(_stream=worker, _stats=stats.to_dict())
            yield batch
        yield {"_stream": worker, "_stats": stats.to_dict(), "_final": True}


class EvalLoader:
    """Every sample of a split exactly once across ranks and workers, in a stable order; one pass per iter()."""

    def __init__(self, dataset: Dataset, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, pin_memory: bool = True):
        _check_args(dataset, split, batch_size, rank, world_size, num_workers)
        self.dataset, self.split, self.num_workers = dataset, split, num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._source = EvalShards(dataset, split, batch_size, rank, world_size, max(1, num_workers))
        self.worker_stats: dict[int, dict] = {}

    @property
    def num_samples(self) -> int:
        """Samples this rank is responsible for (the manifest's count; skipped ones are reported)."""
        lo, _ = self._source.range(0)
        _, hi = self._source.range(self._source.streams - 1)
        return hi - lo

    def __len__(self) -> int:
        """Batches in one pass when nothing is skipped."""
        b = self._source.batch_size
        return sum(math.ceil((hi - lo) / b) for lo, hi in map(self._source.range, range(self._source.streams)))

    def __iter__(self):
        self.worker_stats = {}
        for batch in _batches(self._source, self.num_workers, self.pin_memory):
            self.worker_stats[batch.pop("_stream")] = batch.pop("_stats")
            if batch.pop("_final", False):
                continue
            yield batch
        stats = self.stats()
        if stats["skipped_samples"] or stats["skipped_shards"]:
            log.warning("data: split %r: %s; e.g. %s", self.split, SkipStats(stats).summary(),
                        "; ".join(stats["examples"][:3]))

    def stats(self) -> dict:
        """{samples, skipped_samples, skipped_shards, reasons, examples} of the last (or current) pass."""
        return SkipStats.total(self.worker_stats.values())
