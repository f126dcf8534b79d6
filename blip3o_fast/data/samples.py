"""The per-sample schema check, batch assembly and the skip counters shared by every reader.

A sample is read straight into its row of a preallocated batch (in shared memory inside a DataLoader
worker, so handing the batch to the main process copies nothing), then checked: every member present,
shapes and dtypes as the manifest says, all values finite. A sample that fails is skipped and counted
by reason; its row is reused by the next sample.
"""

from __future__ import annotations

import json
import sys
from collections import deque

import numpy as np
import torch

from .format import COND, META, TARGET, TEXT, Dataset, scale_member
from .quant import check_quantized, dequantize, scale_shape
from .tario import NpyError, SampleIndex, all_finite, read_npy_into

MAX_EXAMPLES = 5


class SkipStats:
    """Counts of good and skipped samples and shards, by reason, with a few recent examples."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.samples = int(state.get("samples", 0))
        self.skipped_samples = int(state.get("skipped_samples", 0))
        self.skipped_shards = int(state.get("skipped_shards", 0))
        self.reasons: dict[str, int] = dict(state.get("reasons", {}))
        self.examples: deque[str] = deque(state.get("examples", []), maxlen=MAX_EXAMPLES)

    def skip_sample(self, reason: str, where: str, count: int = 1) -> None:
        self.skipped_samples += count
        self.reasons[reason] = self.reasons.get(reason, 0) + count
        self.examples.append(f"{where}: {reason}")

    def skip_shard(self, reason: str, where: str) -> None:
        self.skipped_shards += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.examples.append(f"{where}: {reason}")

    def to_dict(self) -> dict:
        return {"samples": self.samples, "skipped_samples": self.skipped_samples,
                "skipped_shards": self.skipped_shards, "reasons": dict(self.reasons),
                "examples": list(self.examples)}

    @staticmethod
    def total(parts) -> dict:
        """Sum of several to_dict() results (e.g. one per worker)."""
        out = SkipStats()
        for part in parts:
            out.samples += part["samples"]
            out.skipped_samples += part["skipped_samples"]
            out.skipped_shards += part["skipped_shards"]
            for reason, n in part["reasons"].items():
                out.reasons[reason] = out.reasons.get(reason, 0) + n
            out.examples.extend(part["examples"])
        return out.to_dict()

    def summary(self) -> str:
        """One line for logs: counts and reasons."""
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        return (f"{self.samples} samples read, {self.skipped_samples} skipped, {self.skipped_shards} shards skipped"
                + (f" ({reasons})" if reasons else ""))


_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.bool: np.bool_, torch.int8: np.int8}
_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised batch tensor; in shared memory inside a DataLoader worker, as default_collate does."""
    if shared:
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        storage = torch.UntypedStorage._new_shared(nbytes)  # what default_collate uses; no copy, unlike share_memory_()
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    return torch.from_numpy(_POOL.get(shape, _NUMPY[dtype]))


class BufferPool:
    """Batch arrays recycled once nothing else holds them.

    A fresh batch of real-shape samples (16 x 2 MB of condition) is above glibc's largest mmap threshold,
    so every one arrives as new pages and filling it page-faults each of them: 3-4x the cost of copying the
    bytes (bench/bench_data.py). An array is reused only when the pool holds its sole reference: a batch
    tensor (or any view of it, or a numpy view of that) keeps its array referenced through its storage, so
    a batch the consumer still holds is never written to."""

    def __init__(self, per_shape: int = 4):
        self.per_shape = per_shape
        self.arrays: dict[tuple, list[np.ndarray]] = {}

    def get(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        arrays = self.arrays.setdefault((tuple(shape), np.dtype(dtype)), [])
        for array in arrays:
            if sys.getrefcount(array) == 3:  # the list, `array` and getrefcount's own argument
                return array
        # numpy backs large arrays with transparent huge pages: filling one faults 2x less than torch.empty
        array = np.empty(shape, dtype=dtype)
        if len(arrays) < self.per_shape:  # beyond that, the consumer keeps batches: plain new arrays
            arrays.append(array)
        return array


_POOL = BufferPool()


class _Stream:
    """The batch rows of one token stream. Float storage is read straight into its row; int8 storage is read
    into scratch rows, checked and dequantised into it, or (`raw`: dequantised on the device after the copy)
    read into int8 and scale rows passed on as `<name>` and `<name>_scale`."""

    def __init__(self, name: str, ext: str, spec, batch_size: int, shared: bool, raw: bool):
        self.name, self.ext, self.spec, self.batch_size, self.shared = name, ext, spec, batch_size, shared
        self.shape = (spec.tokens, spec.dim)
        self.dtype = np.dtype(spec.dtype)
        self.torch_dtype = _TORCH[self.dtype]
        self.raw = spec.int8 and raw
        if spec.int8:
            self.scale_ext = scale_member(ext)
            self.scale_shape = scale_shape(spec.tokens, spec.dim, spec.scale)
            if not self.raw:  # one sample's scratch: dequantised into the batch row
                self.q, self.s = np.empty(self.shape, np.int8), np.empty(self.scale_shape, np.float32)
                self.t_q, self.t_s = torch.from_numpy(self.q), torch.from_numpy(self.s)

    @property
    def exts(self) -> list[str]:
        return [self.ext, self.scale_ext] if self.spec.int8 else [self.ext]

    def new(self) -> None:
        b = self.batch_size
        self.t = _empty((b, *self.shape), torch.int8 if self.raw else self.torch_dtype, self.shared)
        self.rows = self.t.numpy()
        if self.raw:
            self.t_scale = _empty((b, *self.scale_shape), torch.float32, self.shared)
            self.scales = self.t_scale.numpy()

    def read(self, f, members: dict, row: int) -> None:
        if not self.spec.int8:
            read_npy_into(f, *members[self.ext], self.rows[row], self.dtype)
            if not all_finite(self.rows[row]):
                raise NpyError("non-finite", self.name)
            return
        q, s = (self.rows[row], self.scales[row]) if self.raw else (self.q, self.s)
        read_npy_into(f, *members[self.ext], q, np.dtype(np.int8))
        read_npy_into(f, *members[self.scale_ext], s, np.dtype(np.float32))
        check_quantized(q, s, self.name, self.dtype)
        if not self.raw:
            dequantize(self.t_q, self.t_s, self.torch_dtype, out=self.t[row])

    def emit(self, batch: dict, n: int) -> None:
        batch[self.name] = self.t[:n]
        if self.raw:
            batch[f"{self.name}_scale"] = self.t_scale[:n]


class BatchBuilder:
    """Fills batches of `batch_size` samples, one validated sample at a time."""

    def __init__(self, dataset: Dataset, batch_size: int, shared: bool = False):
        self.batch_size = batch_size
        self.shared = shared
        raw = dataset.dequantize == "device"
        self.streams = [_Stream("cond", COND, dataset.cond, batch_size, shared, raw)]
        self.has_target = dataset.target is not None  # a conditions-only dataset: batches without "target"
        if self.has_target:
            self.streams.append(_Stream("target", TARGET, dataset.target, batch_size, shared, raw))
        self.text = dataset.text
        self.required = [e for st in self.streams for e in st.exts] + ([TEXT] if self.text is not None else [])
        self._new()

    def _new(self) -> None:
        b = self.batch_size
        for stream in self.streams:
            stream.new()
        if self.text is not None:
            k = max(self.text.max_captions, 1)
            self.text_dtype = np.dtype(self.text.dtype)
            self.t_text = _empty((b, k, self.text.dim), _TORCH[self.text_dtype], self.shared)
            self.t_mask = _empty((b, k), torch.bool, self.shared)
            self.text_rows, self.mask = self.t_text.numpy(), self.t_mask.numpy()
        self.keys: list[str] = []
        self.captions: list[list[str]] = []

    @property
    def count(self) -> int:
        return len(self.keys)

    @property
    def full(self) -> bool:
        return len(self.keys) == self.batch_size

    def add(self, f, sample: SampleIndex) -> None:
        """Reads and checks one sample into the next row; raises NpyError (with a reason) if it is bad."""
        if sample.problem:
            raise NpyError("bad sample", sample.problem)
        for ext in self.required:
            if ext not in sample.members:
                raise NpyError("missing member", f".{ext}")
        row = len(self.keys)
        for stream in self.streams:
            stream.read(f, sample.members, row)
        if self.text is not None:
            text = self.text_rows[row]
            k = read_npy_into(f, *sample.members[TEXT], text, self.text_dtype, max_rows=self.text.max_captions)
            if not all_finite(text[:k]):
                raise NpyError("non-finite", "text")
            text[k:] = 0
            self.mask[row, :k] = True
            self.mask[row, k:] = False
        captions: list[str] = []
        if META in sample.members:
            offset, size = sample.members[META]
            f.seek(offset)
            try:
                meta = json.loads(f.read(size))
                captions = [str(c) for c in meta.get("captions", [])] if isinstance(meta, dict) else []
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise NpyError("bad json", "unreadable .json member") from None
        self.keys.append(sample.key)
        self.captions.append(captions)

    def emit(self) -> dict:
        """The batch so far (fewer rows than batch_size at the end of a pass); starts a new one."""
        n = len(self.keys)
        batch = {"key": self.keys, "captions": self.captions}
        for stream in self.streams:
            stream.emit(batch, n)
        if self.text is not None:
            batch["text"], batch["text_mask"] = self.t_text[:n], self.t_mask[:n]
        self._new()
        return batch
