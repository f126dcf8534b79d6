"""Indexed reading of local WebDataset shards: member offsets from the tar headers, then reads of
`.npy` payloads straight into preallocated batch rows.

webdataset's `tar_file_iterator` streams a tar (`tarfile` mode "r|*") and copies every member into
fresh bytes; for shards of multi-MB `.npy` members that is about 2x slower than reading a member into
its final place. An index (key -> member offsets) also makes shuffling a permutation of positions (no
sample buffer in memory) and lets a resumed stream seek to where it stopped. Samples are grouped
exactly as webdataset groups them (`base_plus_ext`: the key is the path up to the first dot of the
base name; consecutive members with one key form a sample).
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext


@dataclass
class SampleIndex:
    """One sample of a shard: its key and {extension: (offset, size)} of its members."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    problem: str | None = None


@dataclass
class ShardIndex:
    """The samples of one shard in tar order, and why the scan stopped early (if it did)."""

    samples: list[SampleIndex]
    error: str | None = None


def index_shard(path) -> ShardIndex:
    """Scans the tar headers of a shard (no payload is read); a shard seen before and unchanged since
    (same size and modification time) is not scanned again: a small dataset is read for many epochs, and
    the scan is a 512-byte read and parse per member. Callers must not modify the returned index."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ShardIndex([], "missing shard file")
    except OSError as e:
        return ShardIndex([], f"unreadable tar ({e})")
    return _index_shard(os.fspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _index_shard(path: str, size: int, _mtime_ns: int) -> ShardIndex:
    samples: list[SampleIndex] = []
    try:
        tf = tarfile.open(path, "r:")
    except FileNotFoundError:
        return ShardIndex([], "missing shard file")
    except (OSError, tarfile.TarError) as e:
        return ShardIndex([], f"unreadable tar ({e})")
    error = None
    with tf:
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError) as e:
                error = f"truncated or corrupt tar ({e})"
                break
            if info is None:
                break
            tf.members = []  # the index is ours; don't let tarfile keep every TarInfo
            if not info.isreg():
                continue
            if info.offset_data + info.size > size:
                error = "truncated tar (last member cut short)"
                break
            key, ext = base_plus_ext(info.name)
            if key is None or (key.startswith("__") and key.endswith("__")):
                continue
            ext = ext.lower()
            if not samples or samples[-1].key != key:
                samples.append(SampleIndex(key))
            sample = samples[-1]
            if ext in sample.members:
                sample.problem = f"duplicate member .{ext}"
            sample.members[ext] = (info.offset_data, info.size)
    return ShardIndex(samples, error)


class NpyError(ValueError):
    """A member that is not the .npy array the schema asks for; the message is the skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def npy_header(f, offset: int, size: int) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header bytes) of the .npy member at offset, parsed by numpy's own format code."""
    f.seek(offset)
    head = f.read(min(size, 256))  # numpy pads headers to 64-byte multiples: one read covers it
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise NpyError("bad npy", "not a .npy payload")
    start = 10 if head[6] == 1 else 12
    if len(head) < start:
        raise NpyError("bad npy", "header cut short")
    total = start + int.from_bytes(head[8:start], "little")
    if total > size:
        raise NpyError("bad npy", "header longer than the member")
    if total > len(head):
        head += f.read(total - len(head))
    shape, dtype = _parse_npy_header(bytes(head[:total]))
    return shape, dtype, total


@functools.lru_cache(maxsize=256)
def _parse_npy_header(head: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """numpy's parse (a literal_eval of the header dict) once per distinct header: a shard's members of
    one stream all share theirs."""
    bio = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(bio)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(bio)
    except (ValueError, SyntaxError) as e:
        raise NpyError("bad npy", str(e)) from None
    if fortran and len(shape) > 1:
        raise NpyError("bad dtype", "Fortran-ordered array")
    return tuple(shape), dtype


def read_npy_into(f, offset: int, size: int, out: np.ndarray, dtype: np.dtype, max_rows: int | None = None) -> int:
    """Reads a 2-D .npy member into the C-contiguous rows of `out` ([rows, dim], `dtype`).

    With max_rows=None the array must have exactly out's shape; otherwise it may have 0..max_rows rows
    of out's width. Returns the number of rows read."""
    shape, have, header = npy_header(f, offset, size)
    if have != dtype:
        raise NpyError("bad dtype", f"{have} instead of {dtype}")
    if len(shape) != 2 or shape[1] != out.shape[1] or (
            shape[0] != out.shape[0] if max_rows is None else shape[0] > max_rows):
        want = list(out.shape) if max_rows is None else f"[<= {max_rows}, {out.shape[1]}]"
        raise NpyError("bad shape", f"{list(shape)} instead of {want}")
    rows = shape[0]
    nbytes = rows * out.shape[1] * dtype.itemsize
    if size - header != nbytes:
        raise NpyError("bad npy", f"payload of {size - header} bytes for {nbytes}")
    if nbytes:
        view = memoryview(out[:rows].reshape(-1).view(np.uint8))
        f.seek(offset + header)
        got = f.readinto(view)
        if got != nbytes:
            raise NpyError("bad npy", "short read")
    return rows


# a float is non-finite when its exponent bits are all ones; two integer max-reductions over the raw
# bits find that without a temporary (8x faster than np.isfinite on float16): as signed ints the positive
# inf/nan patterns are the largest values, as unsigned ints the negative ones are.
# The signed reduction runs in torch, 2x faster than numpy's; torch has no unsigned 16/32-bit max.
_NONFINITE = {
    np.dtype(np.float16): (torch.int16, np.uint16, 0x7C00, 0xFC00),
    np.dtype(np.float32): (torch.int32, np.uint32, 0x7F800000, 0xFF800000),
}


def all_finite(x: np.ndarray) -> bool:
    """True when no element of a float16/float32 array is inf or nan."""
    if x.size == 0:
        return True
    signed, unsigned, pos, neg = _NONFINITE[x.dtype]
    return int(torch.from_numpy(x).view(signed).max()) < pos and int(x.view(unsigned).max()) < neg
