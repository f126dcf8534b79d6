"""One job per run folder (docs/architecture.md §4.5): an exclusive lock on `<run>/.lock`, taken before
anything is written into the folder and held for the life of the job.

    with hold_run_lock(run_dir, "train", dist) as lock:   # UserError naming the holder if it is taken
        ...

`flock` where the filesystem supports it: the kernel releases it when the holder dies, however it
dies. Where flock does not work (some network filesystems: ENOLCK, EOPNOTSUPP), a heartbeat file:
the holder rewrites its timestamp every stale/4 seconds, and a lock whose heartbeat is older than
BLIP3O_FAST_LOCK_STALE_S (default 60 s), or whose holder on this host is gone, may be taken over.
Either way the file holds one JSON line naming the holder: host, pid, purpose, start time.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from . import distributed

LOCK_FILE = ".lock"
STALE_ENV = "BLIP3O_FAST_LOCK_STALE_S"
DEFAULT_STALE_S = 60.0
_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}

log = logging.getLogger("blip3o_fast.lock")
_flock = fcntl.flock  # tests swap it for one that fails as on a filesystem without flock


class RunFolderBusy(UserError):
    """Another job holds the run folder."""


def stale_after() -> float:
    return float(os.environ.get(STALE_ENV, DEFAULT_STALE_S))


class RunLock:
    """A held lock; `release()` (or leaving `hold_run_lock`) gives it up."""

    def __init__(self, path: Path, kind: str, record: dict, fd: int | None = None):
        self.path, self.kind, self.record, self._fd = path, kind, record, fd
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self) -> str:
        if self.kind == "flock":
            return f"flock on {self.path}"
        return (f"heartbeat file {self.path} (this filesystem has no working flock; stale after "
                f"{stale_after():g} s without a heartbeat, {STALE_ENV})")

    def release(self) -> None:
        if self._fd is not None:  # the file stays: a waiter may already have it open
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if (_read(self.path) or {}).get("token") == self.record["token"]:
                self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(stale_after() / 4):
            holder = _read(self.path) or {}
            if holder.get("token") != self.record["token"]:
                log.error("lost the run folder lock %s to %s", self.path, _name(holder))
                return
            self.record["heartbeat"] = time.time()
            _write_record(self.path, self.record)


def acquire(folder: str | Path, purpose: str) -> RunLock:
    """Takes `<folder>/.lock` for this process, or raises RunFolderBusy naming the holder (and writes
    nothing into the folder then)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    record = {"host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex}
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # creates nothing when the file exists
    try:
        _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in _BUSY:
            raise _busy(folder, _read(path)) from None
        if e.errno not in _NO_FLOCK:
            raise
        return _acquire_heartbeat(folder, path, record, e)
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    return RunLock(path, "flock", record, fd)


def _acquire_heartbeat(folder: Path, path: Path, record: dict, why: OSError) -> RunLock:
    holder = _read(path)
    if holder is not None and not _stale(holder):
        raise _busy(folder, holder)
    record["heartbeat"] = time.time()
    _write_record(path, record)
    time.sleep(min(0.5, stale_after() / 10))  # two takers racing: the last rename wins, the other backs off
    holder = _read(path)
    if (holder or {}).get("token") != record["token"]:
        raise _busy(folder, holder)
    log.warning("flock does not work on %s (%s): using a heartbeat lock file", folder, os.strerror(why.errno))
    lock = RunLock(path, "heartbeat", record)
    lock._thread = threading.Thread(target=lock._beat, name="run-lock-heartbeat", daemon=True)
    lock._thread.start()
    return lock


def _stale(holder: dict) -> bool:
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return True
    return time.time() - float(holder.get("heartbeat", 0)) > stale_after()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text().strip().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _write_record(path: Path, record: dict) -> None:
    tmp = path.with_name(f"{path.name}.{record['token']}.partial")  # per holder: racing writers never share it
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def _name(holder: dict | None) -> str:
    if not holder:
        return "another process (no holder record yet)"
    return (f"{holder.get('purpose', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {holder.get('started', '?')})")


def _busy(folder: Path, holder: dict | None) -> RunFolderBusy:
    return RunFolderBusy(f"run folder {folder} is in use by {_name(holder)}: one job per run folder; wait for "
                         f"it to end or stop it, or pick another folder")


@contextmanager
def hold_run_lock(folder: str | Path, purpose: str, dist: distributed.Dist | None = None):
    """Holds the run folder's lock for the block. With `dist`, rank 0 takes it and every rank learns
    the outcome (a collective), so all ranks refuse together; other ranks get None."""
    lock, failure = None, None
    if dist is None or dist.is_main:
        try:
            lock = acquire(folder, purpose)
        except Exception as e:  # shared before raising: the other ranks wait for rank 0's word
            failure = e
    if dist is not None and dist.world_size > 1:
        outcome = None if failure is None else (isinstance(failure, RunFolderBusy), str(failure))
        shared = distributed.from_main(outcome)
        if failure is None and shared is not None:
            busy, message = shared
            raise RunFolderBusy(message) if busy else UserError(f"rank 0 could not lock the run folder: {message}")
    if failure is not None:
        raise failure
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
